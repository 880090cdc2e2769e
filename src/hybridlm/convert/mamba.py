"""Mamba (Mamba-1) <-> hybridlm: Mamba mixers ("M") with no MLP ("N") on every layer.

HF's MambaBlock is h + mixer(norm(h)), as hybridlm's Block with MLP letter N; the mixer's
tensors (in_proj, conv1d, x_proj, dt_proj, out_proj, A_log, D) have the same names and
layouts. Mamba has no position limit but hybridlm's config needs one: max_position_embeddings
is set to MAMBA_MAX_POSITIONS (the state is fixed-size, so a larger value costs nothing).
residual_in_fp32 only changes rounding in half precision (hybridlm keeps the residual in the
model's dtype); the time_step_* fields only set the initial dt, so neither is refused.
"""

from __future__ import annotations

from typing import Any

from hybridlm.config import ModelConfig
from hybridlm.convert.common import (
    ConvertError,
    Family,
    State,
    ends,
    refuse_leftovers,
    refuse_unless,
    require_transformers,
    take,
)

MAMBA_MAX_POSITIONS = 65536
MIXER_TENSORS = ("in_proj.weight", "conv1d.weight", "conv1d.bias", "x_proj.weight",
                 "dt_proj.weight", "dt_proj.bias", "out_proj.weight", "A_log", "D")


def config_from_hf(hf_config: Any) -> ModelConfig:
    c = hf_config
    refuse_unless(c, "hidden_act", "silu", "its Mamba mixer gates with silu")
    refuse_unless(c, "use_bias", False, "its in_proj and out_proj have no bias")
    refuse_unless(c, "use_conv_bias", True, "its conv1d has a bias")
    if c.intermediate_size != c.expand * c.hidden_size:
        raise ConvertError(f"mamba config: intermediate_size={c.intermediate_size} is not "
                           f"supported (hybridlm needs expand * hidden_size = "
                           f"{c.expand * c.hidden_size})")
    if c.hidden_size % 2:
        raise ConvertError(f"mamba config: hidden_size={c.hidden_size} is not supported "
                           "(hybridlm needs an even width)")
    return ModelConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, num_hidden_layers=c.num_hidden_layers,
        # No attention layer: one head over the whole width only satisfies the checks.
        num_attention_heads=1, num_key_value_heads=1, intermediate_size=c.intermediate_size,
        max_position_embeddings=MAMBA_MAX_POSITIONS, rms_norm_eps=c.layer_norm_epsilon,
        tie_word_embeddings=bool(c.tie_word_embeddings), initializer_range=c.initializer_range,
        mixer_pattern="M", mlp_pattern="N", mu_guidance=False, num_shared_experts=0,
        mamba_d_state=c.state_size, mamba_d_conv=c.conv_kernel, mamba_expand=c.expand,
        mamba_dt_rank=c.time_step_rank,
    )


def weights_from_hf(hf: State, config: ModelConfig) -> State:
    hf = dict(hf)
    ours = ends(hf, "backbone.embeddings.weight", "backbone.norm_f.weight",
                "embed_tokens.weight", "norm.weight", config.tie_word_embeddings)
    for i in range(config.num_hidden_layers):
        src, dst = f"backbone.layers.{i}.", f"layers.{i}."
        ours[dst + "mixer_norm.weight"] = take(hf, src + "norm.weight")
        for name in MIXER_TENSORS:
            ours[dst + "mixer." + name] = take(hf, src + "mixer." + name)
    refuse_leftovers(hf, from_hf=True)
    return ours


def fits(config: ModelConfig) -> bool:
    return set(config.layer_mixers) == {"M"} and set(config.layer_mlps) == {"N"}


def config_to_hf(config: ModelConfig, token_ids: dict[str, Any]) -> Any:
    transformers = require_transformers()
    c = config
    return transformers.MambaConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, num_hidden_layers=c.num_hidden_layers,
        state_size=c.mamba_d_state, conv_kernel=c.mamba_d_conv, expand=c.mamba_expand,
        intermediate_size=c.mamba_inner_size, time_step_rank=c.mamba_dt_rank_size,
        layer_norm_epsilon=c.rms_norm_eps, tie_word_embeddings=c.tie_word_embeddings,
        initializer_range=c.initializer_range, use_bias=False, use_conv_bias=True,
        hidden_act="silu", **token_ids)


def weights_to_hf(state: State, config: ModelConfig) -> State:
    state = dict(state)
    hf = ends(state, "embed_tokens.weight", "norm.weight", "backbone.embeddings.weight",
              "backbone.norm_f.weight", config.tie_word_embeddings)
    for i in range(config.num_hidden_layers):
        src, dst = f"layers.{i}.", f"backbone.layers.{i}."
        hf[dst + "norm.weight"] = take(state, src + "mixer_norm.weight")
        for name in MIXER_TENSORS:
            hf[dst + "mixer." + name] = take(state, src + "mixer." + name)
    refuse_leftovers(state, from_hf=False)
    return hf


FAMILY = Family("Mamba", "mamba", config_from_hf, weights_from_hf, fits, config_to_hf,
                weights_to_hf)
