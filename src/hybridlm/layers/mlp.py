"""Dense SwiGLU MLP: down(silu(gate(x)) * up(x)); the shared experts of expert layers."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SwiGLU(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (..., hidden) -> (..., hidden)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class SharedExperts(SwiGLU):
    """`count` shared experts of `width` each that every token passes through, as ONE SwiGLU
    of width count * width: the sum of SwiGLUs on the same input is exactly one SwiGLU with
    their hidden units concatenated. Token-routed (T) and learned-MoE (E) layers both add it
    to their routed experts: y = shared(x) + experts(x)."""

    def __init__(self, hidden_size: int, count: int, width: int) -> None:
        super().__init__(hidden_size, count * width)

    @classmethod
    def build(cls, hidden_size: int, count: int, width: int) -> SharedExperts | None:
        """The shared experts, or None when count is 0."""
        return cls(hidden_size, count, width) if count > 0 else None


class DenseMLP(nn.Module):
    """The MLP interface every MLP kind shares: forward(x, *, token_ids) -> (y, stats)."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.ffn = SwiGLU(hidden_size, intermediate_size)

    def forward(
        self, x: torch.Tensor, *, token_ids: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self.ffn(x), {}
