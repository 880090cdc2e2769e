"""PiD-style dynamic residual scaler (Complexity-Deep 3.4, eq. 12-13).

s = sigmoid(Wc [|h|, |mu|, |mu - mu_prev|] + bc), one scalar per token, multiplies the block's
residual contribution: h_out = h_in + s * delta. Norms are RMS (not L2) so the features stay
O(1) whatever the width. Wc starts at zero and bc at `bias_init`, so s starts near
sigmoid(bias_init) for every token.
"""

from __future__ import annotations

import torch
from torch import nn


def _rms(x: torch.Tensor) -> torch.Tensor:
    # The epsilon keeps the gradient finite at x = 0 (layer 0 starts with mu == mu_init).
    return (x.float().pow(2).mean(-1) + 1e-8).sqrt()  # (B, T)


class DynamicScaler(nn.Module):
    def __init__(self, bias_init: float) -> None:
        super().__init__()
        self.bias_init = bias_init
        self.controller = nn.Linear(3, 1)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.controller.weight)
        nn.init.constant_(self.controller.bias, self.bias_init)

    def forward(
        self, h: torch.Tensor, mu: torch.Tensor | None, mu_prev: torch.Tensor | None
    ) -> torch.Tensor:
        """h, mu, mu_prev (B, T, H) (mu terms are 0 without mu guidance) -> s (B, T, 1)."""
        zeros = torch.zeros(h.shape[:-1], device=h.device)
        mu_norm = _rms(mu) if mu is not None else zeros
        delta_norm = _rms(mu - mu_prev) if mu is not None and mu_prev is not None else zeros
        features = torch.stack([_rms(h), mu_norm, delta_norm], dim=-1)  # (B, T, 3)
        return torch.sigmoid(self.controller(features)).to(h.dtype)
