"""Block: one decoder layer = mixer (attention | MLA | Mamba) -> MLP (dense | token_routed | moe),
with mu flowing between layers and an optional PiD-style scaler on the residual:

    a     = mixer(norm(h), mu_prev)
    m     = mlp(norm(h + a), token_ids)        # ScMoE: routed experts read norm(h_prev_block);
                                               # m = 0 and no norm for MLP letter N (no MLP)
    delta = a + m                              # the block's residual contribution
    mu    = update(h + delta, mu_prev)         # only in blocks that produce mu (see below)
    h_out = h + s * delta,  s = scaler(h + delta, mu, mu_prev)   (s = 1 without the scaler)
    h_out = clamp(h_out, -C, C)                # optional activation clamping

The mixer is built from its mixer_pattern letter through the mixer registry (layers/mixers.py).

Mu across a mixed stack: only mixers with reads_mu (GQA attention, "A") read mu. A block
produces a new mu only if its mixer reads mu AND a later block reads it; every other block
carries mu_prev through unchanged. So mu flows from attention layer to attention layer,
across any Mamba or MLA layers in between, and no mu parameter exists that nothing downstream
uses.

Glossary: B batch, T tokens, H hidden.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from hybridlm.config import ModelConfig
from hybridlm.layers.mixers import build_mixer, mixer_reads_mu
from hybridlm.layers.mlps import build_mlp
from hybridlm.layers.mu import MuUpdate
from hybridlm.layers.norm import RMSNorm
from hybridlm.layers.scaler import DynamicScaler


def mu_reading_layers(config: ModelConfig) -> list[bool]:
    """Which layers' mixers read mu (those with reads_mu, e.g. GQA attention, when mu guidance
    is on)."""
    return [config.mu_guidance and mixer_reads_mu(m) for m in config.layer_mixers]


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        c = config
        self.mixer_norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mixer = build_mixer(c, layer_idx)
        self.mlp = build_mlp(c, layer_idx)
        # A block without an MLP (letter N) has no norm for it: no parameter nothing reads.
        self.mlp_norm = (None if getattr(self.mlp, "is_empty", False)
                         else RMSNorm(c.hidden_size, c.rms_norm_eps))
        reads = mu_reading_layers(c)
        produces_mu = reads[layer_idx] and any(reads[layer_idx + 1:])
        self.mu_update = (
            MuUpdate(c.hidden_size, c.mu_update, c.mu_clamp, c.mu_ema_alpha, c.mu_ema_beta)
            if produces_mu else None
        )
        self.scaler = DynamicScaler(c.pid_scaler_bias_init) if c.pid_scaler else None
        self.activation_clamp = c.activation_clamp
        # ScMoE (shortcut-connected MoE): the routed experts read the previous block's input.
        self.uses_shortcut = c.moe_shortcut and getattr(self.mlp, "reads_shortcut", False)

    def forward(
        self,
        h: torch.Tensor,
        *,
        token_ids: torch.Tensor,
        positions: torch.Tensor,
        cache: Any | None,
        mu_prev: torch.Tensor | None,
        prev_input: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, torch.Tensor]]:
        """h (B, T, H), mu_prev (B, T, H) or None, prev_input (B, T, H): the previous block's
        input (ScMoE only) -> (h_out, mu for the next block, mlp stats). segment_ids (B, T):
        packed rows, handed to the mixer (positions are then (B, T))."""
        a = self.mixer(self.mixer_norm(h), positions=positions, cache=cache, mu_prev=mu_prev,
                       segment_ids=segment_ids)
        if self.mlp_norm is None:  # no MLP (letter N): the block is its mixer alone
            delta, stats = a, {}
        else:
            mlp_in = self.mlp_norm(h + a)
            if self.uses_shortcut:
                shortcut = self.mlp_norm(prev_input if prev_input is not None else h)
                m, stats = self.mlp(mlp_in, token_ids=token_ids, shortcut=shortcut)
            else:
                m, stats = self.mlp(mlp_in, token_ids=token_ids)
            delta = a + m
        mu = self.mu_update(h + delta, mu_prev) if self.mu_update is not None else mu_prev
        if self.scaler is not None:
            delta = self.scaler(h + delta, mu, mu_prev) * delta
        h = h + delta
        if self.activation_clamp is not None:
            h = h.clamp(-self.activation_clamp, self.activation_clamp)
        return h, mu, stats
