"""Qwen3 <-> hybridlm: dense GQA attention with QK-norm ("A", attn_qk_norm) + SwiGLU ("D").

Qwen3 normalises q and k per head (RMSNorm over head_dim) before RoPE, as hybridlm's
attn_qk_norm does. Sliding-window layers are refused (hybridlm attends to the whole past).
"""

from __future__ import annotations

from typing import Any

from hybridlm.config import ModelConfig
from hybridlm.convert.common import (
    ConvertError,
    Family,
    State,
    check_gqa_fields,
    gqa_from_hf,
    gqa_sizes,
    gqa_sizes_to_hf,
    gqa_to_hf,
    refuse_unless,
    require_transformers,
    swiglu_from_hf,
    swiglu_to_hf,
)


def config_from_hf(hf_config: Any) -> ModelConfig:
    check_gqa_fields(hf_config)
    refuse_unless(hf_config, "use_sliding_window", False, "it attends to the whole past")
    kinds = sorted(set(getattr(hf_config, "layer_types", None) or ["full_attention"]))
    if kinds != ["full_attention"]:
        raise ConvertError(f"qwen3 config: layer_types={kinds} is not supported (hybridlm "
                           "needs only 'full_attention': it has no sliding-window layers)")
    return ModelConfig(**gqa_sizes(hf_config), mlp_pattern="D", attn_qk_norm=True)


def weights_from_hf(hf: State, config: ModelConfig) -> State:
    return gqa_from_hf(hf, config, swiglu_from_hf, qk_norm=True)


def fits(config: ModelConfig) -> bool:
    return set(config.layer_mixers) == {"A"} and set(config.layer_mlps) == {"D"} \
        and config.attn_qk_norm


def config_to_hf(config: ModelConfig, token_ids: dict[str, Any]) -> Any:
    transformers = require_transformers()
    return transformers.Qwen3Config(**gqa_sizes_to_hf(config), use_sliding_window=False,
                                    **token_ids)


def weights_to_hf(state: State, config: ModelConfig) -> State:
    return gqa_to_hf(state, config, swiglu_to_hf, qk_norm=True)


FAMILY = Family("Qwen3", "qwen3", config_from_hf, weights_from_hf, fits, config_to_hf,
                weights_to_hf)
