"""The MLP contract, the built-in MLP kinds' registry entries, and `build_mlp`.

    D  dense SwiGLU of intermediate_size
    T  token-routed experts (expert = table[token id]; layers/token_routed.py): the
       intermediate_size split over the layer's experts, plus the shared experts
    E  learned MoE (top-k, expert choice or a registered router; layers/moe.py): experts of
       moe_intermediate_size, plus the shared experts
    N  none: the block is its mixer alone (Mamba's own stacks have no MLP); the block then
       has no MLP norm either (layers/block.py)

`mlp_pattern` letters name them through `hybridlm.registry`, so one stack mixes kinds
(mlp_pattern="TE" alternates token-routed and learned-MoE layers). A builder takes
(config, layer index) and returns a module with the MLP interface
forward(x, *, token_ids[, shortcut]) -> (y (B, T, H), stats dict); expert MLPs add the
protocols of layers/routing.py (balancing, active parameters, token tables), and one with
`reads_shortcut = True` is handed the previous block's input (ScMoE). Adding a kind = one
builder + one `register_mlp` line (here for a built-in, or in your own code before the
config is made).
"""

from __future__ import annotations

import torch
from torch import nn

from hybridlm.config import ModelConfig
from hybridlm.layers.mlp import DenseMLP
from hybridlm.layers.moe import MoEMLP
from hybridlm.layers.token_routed import TokenRoutedMLP
from hybridlm.registry import mlp_entry, register_mlp


class NoMLP(nn.Module):
    """MLP letter N: no MLP at all. `is_empty` tells the block to skip it (and its norm)."""

    is_empty = True

    def forward(
        self, x: torch.Tensor, *, token_ids: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return torch.zeros_like(x), {}


def build_dense(config: ModelConfig, layer: int) -> nn.Module:
    return DenseMLP(config.hidden_size, config.intermediate_size)


def build_token_routed(config: ModelConfig, layer: int) -> nn.Module:
    c = config
    experts = c.experts_in_layer(layer)
    expert_width = c.intermediate_size // experts  # the dense width split over the experts
    return TokenRoutedMLP(c.hidden_size, expert_width, experts, c.vocab_size,
                          c.num_shared_experts, c.shared_expert_size(expert_width), c.tr_routing)


def build_learned_moe(config: ModelConfig, layer: int) -> nn.Module:
    return MoEMLP(config, config.experts_in_layer(layer))


def build_no_mlp(config: ModelConfig, layer: int) -> nn.Module:
    return NoMLP()


# The built-in MLP kinds: letter -> builder, in the one table of hybridlm.registry.
register_mlp("D", build_dense, "dense SwiGLU")
register_mlp("T", build_token_routed, "token-routed experts")
register_mlp("E", build_learned_moe, "learned MoE")
register_mlp("N", build_no_mlp, "no MLP (the block is its mixer alone)")


def build_mlp(config: ModelConfig, layer: int) -> nn.Module:
    """The MLP of layer `layer`, from its letter in config.mlp_pattern."""
    return mlp_entry(config.layer_mlps[layer]).builder(config, layer)
