"""Building blocks: norms, RoPE, attention, MLPs, routing, mu guidance, the residual scaler."""

# Registers the built-in mixers (A, L, M) in hybridlm.mixer_registry whenever any layer is
# imported, so config validation knows their letters.
import hybridlm.layers.mixers  # noqa: F401
