"""`HybridLMConfig`: a hybridlm ModelConfig as HF transformers' `PretrainedConfig`.

The config.json of a hybridlm model directory is read as it is: its keys are ModelConfig's
fields (or the old release's names, upgraded by `config_legacy.upgrade`) plus
``"model_type": "hybridlm"``. Every field is checked by ModelConfig (ConfigError naming it)
and then set as an attribute, so HF code that reads `config.vocab_size`,
`config.hidden_size` or `config.num_hidden_layers` finds hybridlm's values.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from transformers import PretrainedConfig

from hybridlm.checkpoint import MODEL_TYPE
from hybridlm.config import ModelConfig
from hybridlm.config_legacy import RENAMED, upgrade

MODEL_FIELDS = tuple(f.name for f in dataclasses.fields(ModelConfig))


class HybridLMConfig(PretrainedConfig):
    model_type = MODEL_TYPE

    def __post_init__(self, **kwargs: Any) -> None:
        # hybridlm's own fields (today's or the old release's names) -> one checked ModelConfig;
        # the rest (dtype, architectures, ...) is HF's to handle.
        ours = {k: kwargs.pop(k) for k in list(kwargs) if k in MODEL_FIELDS or k in RENAMED}
        model_config = ModelConfig.from_dict(upgrade(ours))
        super().__post_init__(**kwargs)
        for name, value in model_config.to_dict().items():
            setattr(self, name, value)

    def to_model_config(self) -> ModelConfig:
        """The hybridlm ModelConfig these attributes describe (checked again: they may have
        been edited since)."""
        return ModelConfig.from_dict({name: getattr(self, name) for name in MODEL_FIELDS})
