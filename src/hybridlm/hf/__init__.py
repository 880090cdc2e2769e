"""hybridlm models in HF transformers (the optional `hf` extra): the only part of hybridlm
that imports `transformers`.

Importing this module registers the classes with HF's Auto classes (model_type "hybridlm"),
so that, with no trust_remote_code:

    AutoModelForCausalLM.from_pretrained(model_dir)     # HybridLMForCausalLM
    AutoTokenizer.from_pretrained(model_dir)            # HybridLMTokenizerFast + chat template
    pipeline("text-generation", model=model_dir)

`import hybridlm` arranges this without importing transformers itself: see
`hybridlm._hf_registration`. `generate()` decodes through hybridlm's own caches (cache.py).

A model directory written before config.json carried `"model_type": "hybridlm"` has nothing
for AutoConfig to dispatch on: open it with `hybridlm.hf.load(dir)` (or
`HybridLMForCausalLM.from_pretrained(dir)`), or save it again to add the key.
"""

from __future__ import annotations

from pathlib import Path

from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from hybridlm.checkpoint import MODEL_TYPE
from hybridlm.hf.cache import HybridLMCache
from hybridlm.hf.config import HybridLMConfig
from hybridlm.hf.modeling import HybridLMForCausalLM
from hybridlm.hf.tokenizer import HybridLMTokenizerFast, jinja_chat_template

__all__ = ["HybridLMCache", "HybridLMConfig", "HybridLMForCausalLM", "HybridLMTokenizerFast",
           "jinja_chat_template", "load", "register"]


def register() -> None:
    """Register the classes with AutoConfig, AutoModelForCausalLM and AutoTokenizer (again:
    a no-op)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if CONFIG_MAPPING._extra_content.get(MODEL_TYPE) is HybridLMConfig:
        return
    AutoConfig.register(MODEL_TYPE, HybridLMConfig)
    AutoModelForCausalLM.register(HybridLMConfig, HybridLMForCausalLM)
    AutoTokenizer.register(HybridLMConfig, fast_tokenizer_class=HybridLMTokenizerFast)


def load(directory: str | Path, **kwargs) -> HybridLMForCausalLM:
    """The model of a hybridlm model directory, with or without model_type in its
    config.json (older directories lack it, so AutoConfig cannot place them); kwargs as
    `HybridLMForCausalLM.from_pretrained`. Its tokenizer: `HybridLMTokenizerFast
    .from_pretrained(directory)`."""
    return HybridLMForCausalLM.from_pretrained(directory, **kwargs)


register()
