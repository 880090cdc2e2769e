"""Building blocks: norms, RoPE, attention, MLPs, routing, mu guidance, the residual scaler."""

# Registers the built-in mixers (A, L, M), MLP kinds (D, T, E) and routers (topk,
# expert_choice) in hybridlm.registry whenever any layer is imported, so config validation
# knows their names.
import hybridlm.layers.mixers
import hybridlm.layers.mlps
import hybridlm.layers.routers  # noqa: F401
