"""What every family's conversion shares: the error type, the lazy transformers import, HF
config field checks, and the attention + norm + embedding layout of Llama-like stacks.

Glossary: H hidden, nh query heads, nkv key/value heads, D head_dim, L layers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from hybridlm.config import ModelConfig

INSTALL_HINT = "pip install 'hybridlm[hf]'"
State = dict[str, torch.Tensor]


class ConvertError(ValueError):
    """A checkpoint or config this converter cannot carry over exactly; one line naming the
    field, its value and what would be accepted."""


def require_transformers() -> Any:
    """The transformers module, or a one-line error saying how to install it."""
    try:
        import transformers
    except ModuleNotFoundError:
        raise ConvertError(
            f"hybridlm convert needs HF transformers, which is not installed: {INSTALL_HINT}"
        ) from None
    transformers.utils.logging.disable_progress_bar()  # a command prints one summary line
    return transformers


@dataclass(frozen=True)
class Family:
    """One HF architecture and how hybridlm maps it, both ways."""

    name: str  # what messages call it: "Llama"
    model_type: str  # HF config.model_type: "llama"
    config_from_hf: Callable[[Any], ModelConfig]  # refuses fields it cannot represent
    weights_from_hf: Callable[[State, ModelConfig], State]
    fits: Callable[[ModelConfig], bool]  # this family is the HF counterpart of the config
    config_to_hf: Callable[[ModelConfig, dict[str, Any]], Any]  # (config, token ids) -> HF
    weights_to_hf: Callable[[State, ModelConfig], State]


# --------------------------------------------------------------------------- HF config checks
def refuse_unless(hf_config: Any, field: str, allowed: Any, why: str) -> None:
    """Refuse `field` of an HF config unless it equals `allowed` (a value, or a tuple of
    accepted values); a missing field counts as accepted (the family's default)."""
    value = getattr(hf_config, field, allowed if not isinstance(allowed, tuple) else allowed[0])
    accepted = allowed if isinstance(allowed, tuple) else (allowed,)
    if value not in accepted:
        shown = " or ".join(repr(a) for a in accepted)
        raise ConvertError(f"{hf_config.model_type} config: {field}={value!r} is not supported "
                           f"(hybridlm needs {shown}: {why})")


def rope_theta_from_hf(hf_config: Any) -> float:
    """RoPE base of an HF config; any RoPE kind but the plain one (scaling: linear, dynamic,
    yarn, llama3, ...) is refused by name."""
    params = getattr(hf_config, "rope_parameters", None) or {}
    kind = params.get("rope_type", "default")
    if kind != "default":
        raise ConvertError(f"{hf_config.model_type} config: rope_parameters.rope_type={kind!r} "
                           "is not supported (hybridlm's RoPE is the plain 'default' kind, "
                           "without scaling)")
    theta = params.get("rope_theta", getattr(hf_config, "rope_theta", None))
    if theta is None:
        raise ConvertError(f"{hf_config.model_type} config: no rope_theta")
    return float(theta)


def check_head_dim(hf_config: Any) -> None:
    """hybridlm's head_dim is hidden_size / num_attention_heads; refuse any other."""
    derived = hf_config.hidden_size // hf_config.num_attention_heads
    head_dim = getattr(hf_config, "head_dim", None)
    if head_dim is not None and (head_dim != derived
                                 or hf_config.hidden_size % hf_config.num_attention_heads):
        raise ConvertError(
            f"{hf_config.model_type} config: head_dim={head_dim} is not supported (hybridlm "
            f"needs head_dim = hidden_size / num_attention_heads = {hf_config.hidden_size} / "
            f"{hf_config.num_attention_heads})")


def check_gqa_fields(hf_config: Any) -> None:
    """The fields every Llama-like attention stack must hold for hybridlm to compute alike."""
    check_head_dim(hf_config)
    refuse_unless(hf_config, "hidden_act", "silu", "its MLPs are SwiGLU")
    refuse_unless(hf_config, "attention_bias", False, "its projections have no bias")
    refuse_unless(hf_config, "mlp_bias", False, "its projections have no bias")
    refuse_unless(hf_config, "attention_dropout", (0.0, 0), "it has no dropout")
    refuse_unless(hf_config, "pretraining_tp", 1, "it computes projections whole")


def gqa_sizes(hf_config: Any) -> dict[str, Any]:
    """The ModelConfig fields of an HF attention stack (no mu guidance, no scaler)."""
    c = hf_config
    return dict(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads or c.num_attention_heads,
        intermediate_size=c.intermediate_size, max_position_embeddings=c.max_position_embeddings,
        rope_theta=rope_theta_from_hf(c), rms_norm_eps=c.rms_norm_eps,
        tie_word_embeddings=bool(c.tie_word_embeddings), initializer_range=c.initializer_range,
        mixer_pattern="A", mu_guidance=False, pid_scaler=False, num_shared_experts=0,
    )


def gqa_sizes_to_hf(config: ModelConfig) -> dict[str, Any]:
    """The HF config fields of a hybridlm attention stack (the inverse of gqa_sizes)."""
    c = config
    return dict(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads, num_key_value_heads=c.num_key_value_heads,
        head_dim=c.head_dim, intermediate_size=c.intermediate_size,
        max_position_embeddings=c.max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta},
        rms_norm_eps=c.rms_norm_eps, tie_word_embeddings=c.tie_word_embeddings,
        initializer_range=c.initializer_range, hidden_act="silu", attention_bias=False,
    )


# --------------------------------------------------------------------------- weight layouts
def take(state: State, name: str) -> torch.Tensor:
    """state[name], popped, or an error naming the missing tensor."""
    if name not in state:
        raise ConvertError(f"the checkpoint has no tensor {name!r}")
    return state.pop(name)


def ends(state: State, embed: str, norm: str, new_embed: str, new_norm: str,
         tied: bool) -> State:
    """The embeddings, final norm and LM head taken from `state` under their new names
    (embed -> new_embed, norm -> new_norm; lm_head.weight keeps its name in both layouts); a
    tied head is the embedding itself."""
    out = {new_embed: take(state, embed), new_norm: take(state, norm)}
    lm_head = take(state, "lm_head.weight")
    out["lm_head.weight"] = out[new_embed] if tied else lm_head
    return out


def refuse_leftovers(state: State, from_hf: bool) -> None:
    """Every tensor of `state` must have been taken: any left is an error, never dropped."""
    if state and from_hf:
        raise ConvertError(f"the checkpoint has tensors this converter does not map: "
                           f"{sorted(state)[:5]}")
    if state:
        raise ConvertError(f"the model has tensors with no HF counterpart: {sorted(state)[:5]}")


def gqa_from_hf(hf: State, config: ModelConfig, mlp_from_hf: Callable[[State, str, str], State],
                qk_norm: bool) -> State:
    """An HF Llama-like state dict (model.*, lm_head) -> hybridlm's, with each layer's MLP
    mapped by `mlp_from_hf(hf, hf_prefix, our_prefix)`. hf is consumed; any tensor left
    over is an error (never dropped)."""
    hf = dict(hf)
    ours = ends(hf, "model.embed_tokens.weight", "model.norm.weight", "embed_tokens.weight",
                "norm.weight", config.tie_word_embeddings)
    for i in range(config.num_hidden_layers):
        src, dst = f"model.layers.{i}.", f"layers.{i}."
        ours[dst + "mixer_norm.weight"] = take(hf, src + "input_layernorm.weight")
        ours[dst + "mlp_norm.weight"] = take(hf, src + "post_attention_layernorm.weight")
        # One fused projection: rows [q (nh*D); k (nkv*D); v (nkv*D)], each (rows, H).
        ours[dst + "mixer.qkv_proj.weight"] = torch.cat(
            [take(hf, src + f"self_attn.{p}_proj.weight") for p in "qkv"], dim=0)
        ours[dst + "mixer.o_proj.weight"] = take(hf, src + "self_attn.o_proj.weight")
        if qk_norm:
            for norm in ("q_norm", "k_norm"):
                ours[dst + f"mixer.{norm}.weight"] = take(hf, src + f"self_attn.{norm}.weight")
        ours.update(mlp_from_hf(hf, src + "mlp.", dst + "mlp."))
    refuse_leftovers(hf, from_hf=True)
    return ours


def gqa_to_hf(state: State, config: ModelConfig,
              mlp_to_hf: Callable[[State, str, str], State], qk_norm: bool) -> State:
    """The inverse of gqa_from_hf: hybridlm state -> HF Llama-like names."""
    state = dict(state)
    c = config
    hf = ends(state, "embed_tokens.weight", "norm.weight", "model.embed_tokens.weight",
              "model.norm.weight", c.tie_word_embeddings)
    q_rows = c.num_attention_heads * c.head_dim
    kv_rows = c.num_key_value_heads * c.head_dim
    for i in range(c.num_hidden_layers):
        src, dst = f"layers.{i}.", f"model.layers.{i}."
        hf[dst + "input_layernorm.weight"] = take(state, src + "mixer_norm.weight")
        hf[dst + "post_attention_layernorm.weight"] = take(state, src + "mlp_norm.weight")
        q, k, v = take(state, src + "mixer.qkv_proj.weight").split([q_rows, kv_rows, kv_rows])
        for name, weight in zip("qkv", (q, k, v), strict=True):
            hf[dst + f"self_attn.{name}_proj.weight"] = weight.contiguous()
        hf[dst + "self_attn.o_proj.weight"] = take(state, src + "mixer.o_proj.weight")
        if qk_norm:
            for norm in ("q_norm", "k_norm"):
                hf[dst + f"self_attn.{norm}.weight"] = take(state, src + f"mixer.{norm}.weight")
        hf.update(mlp_to_hf(state, src + "mlp.", dst + "mlp."))
    refuse_leftovers(state, from_hf=False)
    return hf


def swiglu_from_hf(hf: State, src: str, dst: str) -> State:
    """A dense SwiGLU MLP: HF mlp.{gate,up,down}_proj -> hybridlm mlp.ffn.*."""
    return {f"{dst}ffn.{p}_proj.weight": take(hf, f"{src}{p}_proj.weight")
            for p in ("gate", "up", "down")}


def swiglu_to_hf(state: State, src: str, dst: str) -> State:
    return {f"{dst}{p}_proj.weight": take(state, f"{src}ffn.{p}_proj.weight")
            for p in ("gate", "up", "down")}
