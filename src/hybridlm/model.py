"""HybridLM: embed -> [Block x L] -> RMSNorm -> lm_head (tied).

A Block is  mixer (attention, optionally mu-guided) -> MLP (dense | token_routed),
with mu flowing from block to block and an optional PiD-style scaler on the residual:

    a     = attn(norm(h), mu_prev)
    m     = mlp(norm(h + a), token_ids)
    delta = a + m                                   # the block's residual contribution
    mu    = update(h + delta, mu_prev)              # next layer's mu (Complexity-Deep 3.3)
    h_out = h + s * delta,  s = scaler(h + delta, mu, mu_prev)   (s = 1 without the scaler)
    h_out = clamp(h_out, -C, C)                     # optional activation clamping (3.5)

Layer 0 reads a learnable `mu_init`. The last block produces no mu unless the scaler reads it:
nothing else would consume it, and a parameter that never gets gradient is dead weight.

Glossary: B batch, T tokens, H hidden, V vocab, L layers, E experts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hybridlm.config import ModelConfig
from hybridlm.layers.attention import Attention, KVCache
from hybridlm.layers.experts import GroupedExperts
from hybridlm.layers.mlp import DenseMLP
from hybridlm.layers.mu import MuUpdate
from hybridlm.layers.norm import RMSNorm
from hybridlm.layers.scaler import DynamicScaler
from hybridlm.layers.token_routed import TokenRoutedMLP, TokenRoutedRouter


@dataclass
class ModelOutput:
    logits: torch.Tensor  # (B, T, V)
    loss: torch.Tensor | None = None  # scalar mean next-token cross-entropy (+ aux losses)
    aux: dict[str, Any] = field(default_factory=dict)  # per-layer expert counts, mu norms


@dataclass
class ModelCache:
    """Everything a model needs to continue a sequence: one cache per layer + tokens seen."""

    layers: list[KVCache]
    length: int = 0

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        c = config
        self.attn_norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.attn = Attention(
            c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.rope_theta,
            c.use_qk_norm, use_mu=c.use_mu_guidance, eps=c.rms_norm_eps,
        )
        self.mlp_norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        if c.mlp_type == "token_routed":
            self.mlp = TokenRoutedMLP(
                c.hidden_size, c.expert_intermediate_size, c.num_experts, c.vocab_size,
                c.shared_intermediate_size if c.shared_expert else None,
            )
        else:
            self.mlp = DenseMLP(c.hidden_size, c.intermediate_size)
        is_last = layer_idx == c.num_hidden_layers - 1
        produces_mu = c.use_mu_guidance and (not is_last or c.use_dynamic_scaler)
        self.mu_update = (
            MuUpdate(c.hidden_size, c.mu_update, c.mu_clamp, c.mu_ema_alpha, c.mu_ema_beta)
            if produces_mu else None
        )
        self.scaler = DynamicScaler(c.scaler_bias_init) if c.use_dynamic_scaler else None
        self.activation_clamp = c.activation_clamp

    def forward(
        self,
        h: torch.Tensor,
        *,
        token_ids: torch.Tensor,
        positions: torch.Tensor,
        cache: KVCache | None,
        mu_prev: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, torch.Tensor]]:
        """h (B, T, H), mu_prev (B, T, H) or None -> (h_out, mu or None, mlp stats)."""
        a = self.attn(self.attn_norm(h), positions=positions, cache=cache, mu_prev=mu_prev)
        m, stats = self.mlp(self.mlp_norm(h + a), token_ids=token_ids)
        delta = a + m
        mu = self.mu_update(h + delta, mu_prev) if self.mu_update is not None else None
        if self.scaler is not None:
            delta = self.scaler(h + delta, mu, mu_prev) * delta
        h = h + delta
        if self.activation_clamp is not None:
            h = h.clamp(-self.activation_clamp, self.activation_clamp)
        return h, mu, stats


class HybridLM(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.mu_init = (
            nn.Parameter(torch.zeros(config.hidden_size)) if config.use_mu_guidance else None
        )
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.init_weights()

    # --- initialisation -----------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self) -> None:
        """Normal(0, std) weights; residual output projections scaled by 1/sqrt(2L) (GPT-2);
        mu_proj and the scaler's weights at zero; norms at one."""
        std = self.config.initializer_range
        out_std = std / math.sqrt(2 * self.config.num_hidden_layers)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                is_output = name.endswith(("o_proj", "down_proj"))
                nn.init.normal_(module.weight, 0.0, out_std if is_output else std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, 0.0, std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
            elif isinstance(module, GroupedExperts):
                nn.init.normal_(module.w_gate, 0.0, std)
                nn.init.normal_(module.w_up, 0.0, std)
                nn.init.normal_(module.w_down, 0.0, out_std)
        # Second pass: modules whose Linear children must not keep the generic init above.
        for module in self.modules():
            if isinstance(module, (MuUpdate, DynamicScaler)):
                module.reset_parameters()
        if self.mu_init is not None:
            nn.init.zeros_(self.mu_init)

    # --- forward ------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        *,
        cache: ModelCache | None = None,
    ) -> ModelOutput:
        """input_ids (B, T) long in [0, V); labels (B, T) aligned with input_ids (shifted
        inside, as in HF transformers; -100 = ignore). With `cache`, input_ids continue the
        cached sequence and the cache is advanced by T."""
        self._check_input_ids(input_ids)
        seq = input_ids.shape[1]
        start = cache.length if cache is not None else 0
        if start + seq > self.config.max_position_embeddings:
            raise ValueError(
                f"sequence length {start + seq} exceeds max_position_embeddings="
                f"{self.config.max_position_embeddings}"
            )
        positions = torch.arange(start, start + seq, device=input_ids.device)
        h = self.embed_tokens(input_ids)  # (B, T, H)
        mu = self.mu_init.to(h.dtype).expand_as(h) if self.mu_init is not None else None
        expert_counts, mu_norms = [], []
        for i, block in enumerate(self.layers):
            layer_cache = cache.layers[i] if cache is not None else None
            h, mu, stats = block(
                h, token_ids=input_ids, positions=positions, cache=layer_cache, mu_prev=mu
            )
            if "expert_counts" in stats:
                expert_counts.append(stats["expert_counts"])
            if mu is not None:
                mu_norms.append(mu.detach().float().pow(2).mean().sqrt())
        if cache is not None:
            cache.length = start + seq
        logits = self.lm_head(self.norm(h))  # (B, T, V)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                labels[:, 1:].reshape(-1),
                ignore_index=-100,
            )
        aux = {"expert_counts": expert_counts, "mu_norms": mu_norms}
        return ModelOutput(logits=logits, loss=loss, aux=aux)

    def _check_input_ids(self, input_ids: torch.Tensor) -> None:
        if input_ids.dim() != 2 or input_ids.dtype not in (torch.long, torch.int32, torch.int64):
            raise ValueError(
                f"input_ids must be an integer tensor of shape (batch, seq); got "
                f"{input_ids.dtype} of shape {tuple(input_ids.shape)}"
            )
        if input_ids.numel() == 0:
            raise ValueError("input_ids is empty")
        low, high = int(input_ids.min()), int(input_ids.max())
        vocab = self.config.vocab_size
        if low < 0 or high >= vocab:
            bad = low if low < 0 else high
            raise ValueError(f"token id {bad} is outside [0, vocab_size={vocab})")

    # --- caches and generation ---------------------------------------------------------------
    def new_cache(
        self, batch: int, max_len: int, device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> ModelCache:
        param = self.embed_tokens.weight
        device = device or param.device
        dtype = dtype or param.dtype
        return ModelCache([b.attn.new_cache(batch, max_len, device, dtype) for b in self.layers])

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        do_sample: bool = True,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        eos_token_id: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Continue input_ids (B, T0) by up to max_new_tokens with a KV cache -> (B, T0 + n).
        do_sample=False is greedy. Sequences that emitted eos_token_id are padded with it."""
        from hybridlm.infer.generate import generate

        return generate(
            self, input_ids, max_new_tokens, do_sample=do_sample, temperature=temperature,
            top_k=top_k, top_p=top_p, eos_token_id=eos_token_id, generator=generator,
        )

    # --- routing -------------------------------------------------------------------------------
    def set_routing_table(self, table: torch.Tensor) -> None:
        """Install one token->expert table (V,) in every token-routed layer."""
        routers = [m for m in self.modules() if isinstance(m, TokenRoutedRouter)]
        if not routers:
            raise ValueError("set_routing_table: the model has no token_routed MLP layer")
        for router in routers:
            router.set_table(table)

    # --- sizes ---------------------------------------------------------------------------------
    def num_parameters(self, active: bool = False) -> int:
        """Unique parameters (tied weights counted once). active=True counts only what one
        token uses: for a token-routed layer, one routed expert of E."""
        total = sum(p.numel() for p in self.parameters())
        if not active:
            return total
        inactive = 0
        for module in self.modules():
            if isinstance(module, GroupedExperts):
                per_expert = sum(p[0].numel() for p in module.parameters())
                inactive += (module.num_experts - 1) * per_expert
        return total - inactive

    # --- checkpoints ---------------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path) -> None:
        """Write config.json + model.safetensors into `directory` (created if needed)."""
        from hybridlm.checkpoint import save_model

        save_model(self, directory)

    @classmethod
    def from_pretrained(
        cls, directory: str | Path, device: str | torch.device = "cpu"
    ) -> HybridLM:
        from hybridlm.checkpoint import load_model

        return load_model(cls, directory, device=device)
