"""hybridlm: build, train, evaluate and serve hybrid language models."""

from hybridlm.config import PRESETS, ModelConfig
from hybridlm.config_check import ConfigError
from hybridlm.layers.routing_tables import modulo_routing_table, zipf_routing_table
from hybridlm.model import HybridLM, ModelCache, ModelOutput

__version__ = "0.1.0"

# HF transformers' Auto classes learn about hybridlm models as soon as both are imported, in
# either order; transformers itself is never imported here (see _hf_registration).
from hybridlm import _hf_registration

_hf_registration.arrange()

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
