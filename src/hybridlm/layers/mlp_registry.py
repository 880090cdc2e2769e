"""The MLP registry: one table from an `mlp_pattern` letter to the builder of that MLP kind.

    D  dense SwiGLU
    T  token-routed experts (expert = table[token id]; layers/token_routed.py)
    E  learned MoE (top-k or expert choice; layers/moe.py) -- but with mlp_type="token_routed"
       an E still means token-routed, so configs and model directories written before T
       existed build the same model.

So one stack mixes kinds: mlp_type="moe", mlp_pattern="TE" alternates token-routed and
learned-MoE layers. A builder takes (config, layer index) and returns a module with the MLP
interface forward(x, *, token_ids[, shortcut]) -> (y (B, T, H), stats dict); expert MLPs add
the protocols of layers/routing.py. `register_mlp` adds a kind from anywhere (a test, a
plugin) without editing this file.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from hybridlm import config as config_module
from hybridlm.config import ModelConfig
from hybridlm.layers.mlp import DenseMLP
from hybridlm.layers.moe import MoEMLP
from hybridlm.layers.token_routed import TokenRoutedMLP

MlpBuilder = Callable[[ModelConfig, int], nn.Module]


def build_dense(config: ModelConfig, layer: int) -> nn.Module:
    return DenseMLP(config.hidden_size, config.intermediate_size)


def build_token_routed(config: ModelConfig, layer: int) -> nn.Module:
    c = config
    experts = c.experts_in_layer(layer)
    expert_width = c.intermediate_size // experts  # the dense width split over the experts
    shared = (c.shared_expert_intermediate_size or expert_width) if c.shared_expert else None
    return TokenRoutedMLP(c.hidden_size, expert_width, experts, c.vocab_size, shared, c.routing)


def build_learned_moe(config: ModelConfig, layer: int) -> nn.Module:
    return MoEMLP(config, config.experts_in_layer(layer))


MLP_BUILDERS: dict[str, MlpBuilder] = {
    "D": build_dense,
    "T": build_token_routed,
    "E": build_learned_moe,
}


def register_mlp(letter: str, builder: MlpBuilder, description: str) -> None:
    """Make `letter` an mlp_pattern letter built by `builder(config, layer)`; `description`
    is what config errors list for it. Its layers get `experts_in_layer` experts."""
    if len(letter) != 1 or not letter.isupper():
        raise ValueError(f"MLP letter {letter!r} must be one upper-case letter")
    if letter in MLP_BUILDERS:
        raise ValueError(f"MLP letter {letter!r} is taken; taken: {sorted(MLP_BUILDERS)}")
    MLP_BUILDERS[letter] = builder
    config_module.MLP_LETTERS[letter] = description


def build_mlp(config: ModelConfig, layer: int) -> nn.Module:
    """The MLP of one layer, from its letter (E resolved by mlp_type, see the module doc)."""
    return MLP_BUILDERS[config.layer_mlp_kinds[layer]](config, layer)
