"""hybridlm: build, train, evaluate and serve hybrid language models."""

from hybridlm.config import PRESETS, ModelConfig
from hybridlm.config_check import ConfigError
from hybridlm.layers.routing_tables import modulo_routing_table, zipf_routing_table
from hybridlm.model import HybridLM, ModelCache, ModelOutput

__version__ = "0.1.0"

__all__ = [
    "PRESETS",
    "ConfigError",
    "HybridLM",
    "ModelCache",
    "ModelConfig",
    "ModelOutput",
    "modulo_routing_table",
    "zipf_routing_table",
]
