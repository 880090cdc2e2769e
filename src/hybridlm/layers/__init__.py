"""Building blocks: norms, RoPE, attention, MLPs, routing, mu guidance, the residual scaler."""
