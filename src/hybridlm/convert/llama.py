"""Llama <-> hybridlm: dense GQA attention ("A", no mu guidance, no QK-norm) + SwiGLU ("D").

Tied and untied embeddings both map (tie_word_embeddings carries over).
"""

from __future__ import annotations

from typing import Any

from hybridlm.config import ModelConfig
from hybridlm.convert.common import (
    Family,
    State,
    check_gqa_fields,
    gqa_from_hf,
    gqa_sizes,
    gqa_sizes_to_hf,
    gqa_to_hf,
    require_transformers,
    swiglu_from_hf,
    swiglu_to_hf,
)


def config_from_hf(hf_config: Any) -> ModelConfig:
    check_gqa_fields(hf_config)
    return ModelConfig(**gqa_sizes(hf_config), mlp_pattern="D", attn_qk_norm=False)


def weights_from_hf(hf: State, config: ModelConfig) -> State:
    return gqa_from_hf(hf, config, swiglu_from_hf, qk_norm=False)


def fits(config: ModelConfig) -> bool:
    return set(config.layer_mixers) == {"A"} and set(config.layer_mlps) == {"D"} \
        and not config.attn_qk_norm


def config_to_hf(config: ModelConfig, token_ids: dict[str, Any]) -> Any:
    transformers = require_transformers()
    return transformers.LlamaConfig(**gqa_sizes_to_hf(config), mlp_bias=False, **token_ids)


def weights_to_hf(state: State, config: ModelConfig) -> State:
    return gqa_to_hf(state, config, swiglu_to_hf, qk_norm=False)


FAMILY = Family("Llama", "llama", config_from_hf, weights_from_hf, fits, config_to_hf,
                weights_to_hf)
