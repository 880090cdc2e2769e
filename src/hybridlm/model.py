"""HybridLM: embed -> [Block x L] -> RMSNorm -> lm_head (tied).

Each Block (layers/block.py) is a mixer (GQA attention, MLA or Mamba) followed by an MLP
(dense, token-routed or learned MoE), laid out over the depth by the config's pattern
strings; mu flows from attention layer to attention layer, starting from a learnable
`mu_init`.

Glossary: B batch, T tokens, H hidden, V vocab, L layers, E experts.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hybridlm.config import ModelConfig
from hybridlm.layers.block import Block, mu_reading_layers
from hybridlm.layers.cache_rows import advanced, common_length, zero_lengths
from hybridlm.layers.moe import causal_routing
from hybridlm.layers.norm import RMSNorm
from hybridlm.layers.rope import segment_positions, segment_starts
from hybridlm.layers.routing import ExpertMLP, LoadBalanced, TokenTableRouted
from hybridlm.ops import host_reads_allowed, linear_cross_entropy


@dataclass
class ModelOutput:
    logits: torch.Tensor | None  # (B, T, V); None when the forward was asked for the loss only
    loss: torch.Tensor | None = None  # scalar mean next-token cross-entropy (+ aux losses)
    aux: dict[str, Any] = field(default_factory=dict)  # router stats per layer, mu norms
    lm_loss: torch.Tensor | None = None  # scalar: the next-token term of `loss` (with grad)


@dataclass
class ModelCache:
    """Everything a model needs to continue a batch of sequences: one cache per layer + the
    tokens each row has seen. Layer caches are the mixers' own (KV, MLA latent, or Mamba
    conv/SSM state), each with the same per-row `lengths` (see layers/cache_rows.py)."""

    layers: list[Any]
    lengths: torch.Tensor | None = None  # (B,) long; None: zeros (B from the layer caches)
    # Set for a forward that must not read the device from the host (a CUDA-graph decode
    # step): attention covers this many slots of every row, and the caller guarantees that
    # each row's length + its new tokens fit in it (see layers/cache_rows.py).
    key_window: int | None = None

    def __post_init__(self) -> None:
        if self.lengths is None:
            self.lengths = self.layers[0].lengths.clone()

    @property
    def length(self) -> int:
        """The tokens every row has seen (ValueError when rows differ: read `lengths`)."""
        return common_length(self.lengths)

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)

    def reset_rows(self, rows: torch.Tensor) -> None:
        """Empty rows (R,) long of every layer cache, as in a new cache; other rows keep
        their state (a slot of a continuous-batching pool handed to a new sequence). In place,
        so a captured CUDA graph that reads the lengths keeps reading the same memory."""
        self.lengths.index_fill_(0, rows.to(self.lengths.device), 0)
        for layer in self.layers:
            layer.reset_rows(rows)

    @contextlib.contextmanager
    def feeding(self, input_lengths: torch.Tensor | None) -> Iterator[None]:
        """Tell every layer cache how many tokens of the call are real per row (None: all),
        and the key window of a host-sync-free call."""
        for layer in self.layers:
            layer.input_lengths = input_lengths
            layer.key_window = self.key_window
        try:
            yield
        finally:
            for layer in self.layers:
                layer.input_lengths = None
                layer.key_window = None


class HybridLM(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.mu_init = (
            nn.Parameter(torch.zeros(config.hidden_size))
            if any(mu_reading_layers(config)) else None
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
                is_output = name.endswith(("o_proj", "down_proj", "out_proj"))
                nn.init.normal_(module.weight, 0.0, out_std if is_output else std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, 0.0, std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
            elif hasattr(module, "init_stacked_weights"):  # e.g. GroupedExperts
                module.init_stacked_weights(std, out_std)
        # Second pass: our own modules with a special init (mu at zero, the scaler's bias,
        # Mamba's A and dt) override the generic init of their Linear children above.
        for module in self.modules():
            if type(module).__module__.startswith("hybridlm.") and hasattr(
                module, "reset_parameters"
            ):
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
        segment_ids: torch.Tensor | None = None,
        num_items_in_batch: torch.Tensor | int | None = None,
        input_lengths: torch.Tensor | None = None,
        return_logits: bool = True,
    ) -> ModelOutput:
        """input_ids (B, T) long in [0, V); labels (B, T) aligned with input_ids (shifted
        inside, as in HF transformers; -100 = ignore). With `cache`, input_ids continue the
        cached sequences, each row from its own length (cache.lengths (B,); RoPE positions and
        masks per row), and the cache is advanced by T.

        input_lengths (B,) long, with a cache only: input_ids are right-padded and row b's
        first input_lengths[b] tokens are real. Row b then advances by input_lengths[b] (its
        Mamba state stops at its last real token); logits at padded tokens are meaningless.

        segment_ids (B, T) int: several examples packed in one row, a new example beginning
        wherever the id changes. Each example is computed as if it were alone (attention is
        block-diagonal causal, positions restart at 0, Mamba state and conv restart), and the
        label at an example's first token is ignored, so no prediction crosses a boundary.
        Per-token MLPs keep this exact; a learned MoE with capacity limits or expert choice
        still sees the whole batch, as it does unpacked. Not with a cache.

        num_items_in_batch (as in HF transformers): the next-token loss is the sum of the
        token losses divided by it instead of their mean, so micro-batches with different
        numbers of targets add up to the token mean of the whole batch when it is the batch's
        target count (`count_targets`). Aux losses are added unscaled either way.

        return_logits=False (with labels; the trainer passes it): the output's logits are None
        and the loss goes through `ops.linear_cross_entropy`, which runs the LM head in
        chunks of tokens, so the (B, T, V) logits never exist, in the forward or the backward.
        The loss equals the default's to rounding."""
        if not return_logits and labels is None:
            raise ValueError("return_logits=False asks for the loss alone, so it needs labels")
        self._check_inputs(input_ids, cache, segment_ids, input_lengths)
        seq = input_ids.shape[1]
        start = cache.lengths if cache is not None else None  # (B,)
        if segment_ids is not None:
            positions = segment_positions(segment_ids)  # (B, T)
        elif cache is not None and cache.key_window is not None:  # no host read: per row
            positions = start[:, None] + torch.arange(seq, device=input_ids.device)  # (B, T)
        else:
            positions = cache_positions(start, seq, input_ids.device)  # (T,) or (B, T)
        h = self.embed_tokens(input_ids)  # (B, T, H)
        mu = self.mu_init.to(h.dtype).expand_as(h) if self.mu_init is not None else None
        prev_input = h
        stats_per_layer, mu_norms = [], []
        feeding = cache.feeding(input_lengths) if cache is not None else contextlib.nullcontext()
        with feeding:
            for i, block in enumerate(self.layers):
                layer_cache = cache.layers[i] if cache is not None else None
                block_input = h
                h, mu, stats = block(h, token_ids=input_ids, positions=positions,
                                     cache=layer_cache, mu_prev=mu, prev_input=prev_input,
                                     segment_ids=segment_ids)
                prev_input = block_input
                stats_per_layer.append(stats)
                if block.mu_update is not None:
                    mu_norms.append(mu.detach().float().pow(2).mean().sqrt())
        if cache is not None:
            cache.lengths = advanced(start, seq, input_lengths)
        h = self.norm(h)  # (B, T, H)
        logits = self.lm_head(h) if return_logits else None  # (B, T, V)
        aux = _collect_aux(stats_per_layer)
        aux["mu_norms"] = mu_norms
        if labels is None:
            return ModelOutput(logits=logits, aux=aux)
        lm_loss = next_token_loss(logits, labels, segment_ids, num_items_in_batch,
                                  hidden=h, head_weight=self.lm_head.weight)
        aux["lm_loss"] = lm_loss.detach()
        loss = lm_loss + aux["aux_loss"] if "aux_loss" in aux else lm_loss
        return ModelOutput(logits=logits, loss=loss, aux=aux, lm_loss=lm_loss)

    def _check_inputs(
        self, input_ids: torch.Tensor, cache: ModelCache | None,
        segment_ids: torch.Tensor | None, input_lengths: torch.Tensor | None,
    ) -> None:
        """Every argument of `forward` against the others and the config (ValueError)."""
        # A CUDA-graph decode step (a key window): shapes are checked, values are the caller's
        # (reading them would wait for the device, which a graph capture forbids).
        static = cache is not None and cache.key_window is not None
        self._check_input_ids(input_ids, values=not static)
        if segment_ids is not None:
            self._check_segment_ids(segment_ids, input_ids, cache)
        if cache is not None:
            self.check_causal()
        if static:
            return
        self._check_input_lengths(input_lengths, input_ids, cache)
        seq = input_ids.shape[1]
        if cache is not None and not host_reads_allowed():
            return  # the cached lengths are device values (see _check_input_ids)
        end = seq if cache is None else int(advanced(cache.lengths, seq, input_lengths).max())
        if end > self.config.max_position_embeddings:
            raise ValueError(
                f"sequence length {end} exceeds max_position_embeddings="
                f"{self.config.max_position_embeddings}"
            )

    @staticmethod
    def _check_segment_ids(
        segment_ids: torch.Tensor, input_ids: torch.Tensor, cache: ModelCache | None
    ) -> None:
        if cache is not None:
            raise ValueError(
                "segment_ids (packed rows) cannot be used with a cache: decode one sequence "
                "per row instead"
            )
        if segment_ids.shape != input_ids.shape or segment_ids.is_floating_point() or (
            segment_ids.dtype == torch.bool
        ):
            raise ValueError(
                f"segment_ids must be an integer tensor shaped like input_ids "
                f"{tuple(input_ids.shape)}; got {segment_ids.dtype} of shape "
                f"{tuple(segment_ids.shape)}"
            )

    @staticmethod
    def _check_input_lengths(
        input_lengths: torch.Tensor | None, input_ids: torch.Tensor, cache: ModelCache | None
    ) -> None:
        if input_lengths is None:
            return
        if cache is None:
            raise ValueError("input_lengths needs a cache: it says how far each row's cache "
                             "advances (a forward without a cache ignores right padding)")
        batch, seq = input_ids.shape
        if (input_lengths.shape != (batch,) or input_lengths.is_floating_point()
                or input_lengths.dtype == torch.bool):
            raise ValueError(f"input_lengths must be an integer tensor of shape ({batch},); got "
                             f"{input_lengths.dtype} of shape {tuple(input_lengths.shape)}")
        if not host_reads_allowed():
            return  # values are device data here (see _check_input_ids)
        low, high = int(input_lengths.min()), int(input_lengths.max())
        if low < 0 or high > seq:
            raise ValueError(f"input_lengths holds {low if low < 0 else high}, outside "
                             f"[0, {seq}] (the {seq} tokens of input_ids)")

    def _check_input_ids(self, input_ids: torch.Tensor, values: bool = True) -> None:
        if input_ids.dim() != 2 or input_ids.dtype not in (torch.long, torch.int32, torch.int64):
            raise ValueError(
                f"input_ids must be an integer tensor of shape (batch, seq); got "
                f"{input_ids.dtype} of shape {tuple(input_ids.shape)}"
            )
        if input_ids.numel() == 0:
            raise ValueError("input_ids is empty")
        if not values or not host_reads_allowed():
            # Reading the ids' range waits for the device, breaks a compiled graph and is
            # illegal in a CUDA graph capture: compiled and captured forwards (and static
            # decode steps) check shapes and dtypes only (eager ones check the values).
            return
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
        return ModelCache([b.mixer.new_cache(batch, max_len, device, dtype) for b in self.layers],
                          zero_lengths(batch, device))

    def kv_cache_bytes_per_token(self, dtype: torch.dtype = torch.bfloat16) -> int:
        """Cache bytes each generated token adds, over all layers, measured on the caches
        `generate` allocates (built on the meta device: nothing is allocated). Mamba layers
        add 0 per token; their fixed state is in `cache_fixed_bytes`."""
        one = self.new_cache(1, 1, torch.device("meta"), dtype).nbytes()
        two = self.new_cache(1, 2, torch.device("meta"), dtype).nbytes()
        return two - one

    def cache_fixed_bytes(self, dtype: torch.dtype = torch.bfloat16) -> int:
        """Cache bytes per sequence that do not grow with its length (Mamba states)."""
        one = self.new_cache(1, 1, torch.device("meta"), dtype).nbytes()
        return one - self.kv_cache_bytes_per_token(dtype)

    @property
    def is_causal(self) -> bool:
        """False when a layer's output depends on later tokens (expert-choice routing,
        outside `causal_routing`)."""
        return all(getattr(b.mlp, "is_causal", True) for b in self.layers)

    def causal_routing(self, enabled: bool = True) -> contextlib.AbstractContextManager[None]:
        """`with model.causal_routing():` expert-choice layers route by token choice over the
        same router scores (each token its round(capacity_factor) best experts; see
        ExpertChoiceRouter), so logits at t depend on tokens <= t only: a causal held-out
        loss, and cached decoding / generate work. No effect on other layers."""
        return causal_routing(self, enabled)

    def check_causal(self) -> None:
        """ValueError unless the model can decode with a cache (see `is_causal`)."""
        if not self.is_causal:
            raise ValueError(
                "moe_router='expert_choice' is not causal (an expert picks its tokens from the "
                "whole sequence, future ones included), so it cannot decode with a cache or "
                "generate; use moe_router='topk' for models that generate, or decode inside "
                "`with model.causal_routing():` (token-choice routing over the same router)"
            )

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor | Sequence[Sequence[int]],
        max_new_tokens: int,
        do_sample: bool = True,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        eos_token_id: int | None = None,
        generator: torch.Generator | None = None,
        stop_strings: Sequence[str] | None = None,
        tokenizer=None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor | list[list[int]]:
        """Continue input_ids (B, T0) by up to max_new_tokens -> (B, T0 + n), on the model's
        device. do_sample=False is greedy. Sequences that emitted eos_token_id are padded with
        it, as are those whose text reached one of `stop_strings` (decoded with `tokenizer`).

        Prompts of different lengths: a list of id lists (-> a list of id lists, each prompt
        + its own new tokens), or input_ids with attention_mask (B, T0) for left- or
        right-padded rows (-> (B, T0 + n)). Runs every prompt as a request of the
        continuous-batching engine; see `hybridlm.infer.generate.generate`."""
        from hybridlm.infer.generate import generate  # infer builds on the model: call down

        return generate(
            self, input_ids, max_new_tokens, do_sample=do_sample, temperature=temperature,
            top_k=top_k, top_p=top_p, eos_token_id=eos_token_id, generator=generator,
            stop_strings=stop_strings, tokenizer=tokenizer, attention_mask=attention_mask,
        )

    # --- routing (the protocols of layers/routing.py) --------------------------------------
    def _token_table_mlps(self, caller: str) -> list[TokenTableRouted]:
        mlps = [m for m in self.modules() if isinstance(m, TokenTableRouted)]
        if not mlps:
            raise ValueError(f"{caller}: the model has no token_routed MLP layer")
        return mlps

    def set_routing_table(self, table: torch.Tensor) -> None:
        """Install one token->expert table (V,) in every token-routed layer."""
        for mlp in self._token_table_mlps("set_routing_table"):
            mlp.set_routing_table(table)

    def set_zipf_routing(self, token_counts: torch.Tensor) -> None:
        """Frequency-balanced tables from corpus counts (V,), one per expert count, so layers
        with different numbers of experts each get their own bin packing."""
        memo: dict[int, torch.Tensor] = {}  # expert count -> table, shared by the layers
        for mlp in self._token_table_mlps("set_zipf_routing"):
            mlp.set_token_counts(token_counts, memo)

    def fit_routing(self, token_counts: torch.Tensor) -> None:
        """Give every layer whose configured routing reads the corpus (token-routed with
        tr_routing="zipf") its table from the corpus counts (V,); other layers are untouched."""
        memo: dict[int, torch.Tensor] = {}
        for module in self.modules():
            if isinstance(module, TokenTableRouted):
                module.fit_to_corpus(token_counts, memo)

    def _balanced_mlps(self) -> list[LoadBalanced]:
        return [m for m in self.modules() if isinstance(m, LoadBalanced)]

    def discard_balance_loads(self) -> None:
        """Forget the expert loads gathered since the last balance_step (a skipped step)."""
        for mlp in self._balanced_mlps():
            mlp.discard_loads()

    # --- MoE load balancing ----------------------------------------------------------------
    def balance_step(self, reduce: Callable[[torch.Tensor], None] | None = None) -> None:
        """Update every balanced layer's state from the expert loads gathered since the
        last call; call it after every optimizer step. `reduce` sums each layer's loads (E,)
        over data-parallel ranks in place (the trainer passes
        `hybridlm.parallel.sum_over_ranks`); None: this process's loads alone. The model
        never calls torch.distributed itself."""
        for mlp in self._balanced_mlps():
            load = mlp.pending_load().clone()
            if reduce is not None:
                reduce(load)
            mlp.apply_balance(load)

    # --- sizes ---------------------------------------------------------------------------------
    def num_parameters(self, active: bool = False) -> int:
        """Unique parameters (tied weights counted once). active=True counts only what one
        token uses: of each layer's routed experts, one (token-routed), k (top-k) or, on
        average, capacity_factor (expert choice)."""
        total = sum(p.numel() for p in self.parameters())
        if not active:
            return total
        inactive = sum(m.inactive_parameters() for m in self.modules() if isinstance(m, ExpertMLP))
        return total - round(inactive)

    # --- checkpoints (hybridlm.checkpoint, imported when called: it imports this module) ----
    def save_pretrained(self, directory: str | Path, max_shard_size: int | str = "5GB") -> None:
        """Write config.json + model.safetensors into `directory` (created if needed); a model
        larger than `max_shard_size` (bytes, or e.g. "5GB", "500MB") is written as shards
        model-00001-of-0000N.safetensors + model.safetensors.index.json."""
        from hybridlm.checkpoint import save_model

        save_model(self, directory, max_shard_size=max_shard_size)

    @classmethod
    def from_pretrained(
        cls, directory: str | Path, device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
    ) -> HybridLM:
        """The model of a directory (either weights layout), its tensors read one at a time
        straight onto `device` in `dtype` (None: fp32, as built); see hybridlm.checkpoint."""
        from hybridlm.checkpoint import load_model

        return load_model(cls, directory, device=device, dtype=dtype)


def cache_positions(start: torch.Tensor | None, seq: int, device: torch.device
                    ) -> torch.Tensor:
    """Positions of T = seq new tokens after `start` (B,) cached ones (None: no cache):
    (T,) when every row starts at the same length (the batch shares one position per
    token), else (B, T), row b numbered from start[b]."""
    if start is None:
        return torch.arange(seq, device=device)
    first = int(start[0])
    if bool((start == first).all()):
        return torch.arange(first, first + seq, device=device)
    return start[:, None] + torch.arange(seq, device=device)  # (B, T)


def next_token_targets(labels: torch.Tensor, segment_ids: torch.Tensor | None = None
                       ) -> torch.Tensor:
    """labels (B, T) -> the targets (B, T-1) that positions 0..T-2 predict, -100 where none:
    labels shifted by one, and in packed rows nothing at an example's first token (it is not
    predicted from the previous example's last one)."""
    targets = labels[:, 1:]
    if segment_ids is not None:
        targets = targets.masked_fill(segment_starts(segment_ids)[:, 1:], -100)
    return targets


def next_token_loss(
    logits: torch.Tensor | None, labels: torch.Tensor, segment_ids: torch.Tensor | None = None,
    num_items_in_batch: torch.Tensor | int | None = None, *,
    hidden: torch.Tensor | None = None, head_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """labels (B, T) -> () float32 next-token cross-entropy: the mean over the targets, or
    their sum divided by num_items_in_batch (see HybridLM.forward). From logits (B, T, V), or,
    when logits is None, from hidden (B, T, H) and head_weight (V, H) through the fused chunked
    head, which never holds the (B, T, V) logits."""
    targets = next_token_targets(labels, segment_ids).reshape(-1)  # (B*(T-1),)
    reduction = "mean" if num_items_in_batch is None else "sum"
    if logits is not None:
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), targets,
                               ignore_index=-100, reduction=reduction)
    else:
        flat = hidden[:, :-1].reshape(-1, hidden.shape[-1])  # (B*(T-1), H)
        loss = linear_cross_entropy(flat, head_weight, targets, ignore_index=-100,
                                    reduction=reduction)
    return loss if num_items_in_batch is None else loss / num_items_in_batch


def count_targets(labels: torch.Tensor, segment_ids: torch.Tensor | None = None
                  ) -> torch.Tensor:
    """The number of supervised next-token targets in a batch: () long."""
    return (next_token_targets(labels, segment_ids) != -100).sum()


def _collect_aux(stats_per_layer: list[dict[str, torch.Tensor]]) -> dict[str, Any]:
    """Per-layer router statistics -> lists over the expert layers, plus the summed aux loss."""
    aux: dict[str, Any] = {"expert_counts": [], "router_entropy": [], "dropped_tokens": []}
    aux_losses = []
    for stats in stats_per_layer:
        for key in ("expert_counts", "router_entropy", "dropped_tokens"):
            if key in stats:
                aux[key].append(stats[key])
        if "aux_loss" in stats:
            aux_losses.append(stats["aux_loss"])
    if aux_losses:
        aux["aux_loss"] = torch.stack(aux_losses).sum()
    return aux
