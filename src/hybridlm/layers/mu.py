"""Mu guidance state update (Complexity-Deep 3.3).

mu is a (B, T, H) latent that flows from layer to layer alongside the residual stream and is
read by the next layer's attention. Two update rules:
  "clamp" (project page): mu = clamp(mu_param + mu_proj(h), -c, c)
  "ema"   (paper eq. 11): mu = alpha * mu_prev + beta * mu_proj(h)
mu_proj starts at zero, so at init mu is mu_param (clamp) or alpha*mu_prev (ema).
"""

from __future__ import annotations

import torch
from torch import nn


class MuUpdate(nn.Module):
    def __init__(
        self, hidden_size: int, rule: str, clamp: float, alpha: float, beta: float
    ) -> None:
        super().__init__()
        self.rule = rule
        self.clamp, self.alpha, self.beta = clamp, alpha, beta
        self.mu_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.mu_param = nn.Parameter(torch.zeros(hidden_size)) if rule == "clamp" else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.mu_proj.weight)
        if self.mu_param is not None:
            nn.init.zeros_(self.mu_param)

    def forward(self, h: torch.Tensor, mu_prev: torch.Tensor) -> torch.Tensor:
        """h (B, T, H) block output, mu_prev (B, T, H) -> mu (B, T, H)."""
        if self.mu_param is not None:
            return torch.clamp(self.mu_param + self.mu_proj(h), -self.clamp, self.clamp)
        return self.alpha * mu_prev + self.beta * self.mu_proj(h)
