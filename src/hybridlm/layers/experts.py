"""GroupedExperts: the one module that computes any routing's result.

A router (token-routed table, learned top-k, expert choice) only decides
`expert_ids (N, k)` and optional `weights (N, k)`; this module sorts the routed slots by expert,
runs each expert on its contiguous group (offsets from the real per-expert counts) and
scatters the weighted results back to their tokens.

Glossary: N tokens, k experts per token, E experts, H hidden, I expert width.
"""

from __future__ import annotations

import torch
from torch import nn

from hybridlm import ops


class GroupedExperts(nn.Module):
    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.num_experts = num_experts
        # Stacked SwiGLU weights, laid out for x @ W (so a grouped GEMM can use them as is).
        self.w_gate = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        self.w_up = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        self.w_down = nn.Parameter(torch.empty(num_experts, intermediate_size, hidden_size))

    def forward(
        self, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x (N, H), expert_ids (N, k), weights (N, k) or None (all ones).

        Returns y (N, H) = sum_j weights[n, j] * Expert[expert_ids[n, j]](x[n]), and the
        per-expert slot counts (E,).
        """
        num_tokens, top_k = expert_ids.shape
        token_idx = torch.arange(num_tokens, device=x.device).repeat_interleave(top_k)
        flat_weights = weights.reshape(-1) if weights is not None else None
        return self.forward_slots(x, token_idx, expert_ids.reshape(-1), flat_weights)

    def forward_slots(
        self,
        x: torch.Tensor,
        token_idx: torch.Tensor,
        expert_idx: torch.Tensor,
        weights: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Routed slots in any number per token (expert choice, dropped tokens).

        x (N, H); token_idx, expert_idx, weights: (M,) — slot m sends token token_idx[m] to
        expert expert_idx[m] with weight weights[m]. A token in no slot gets y = 0.
        Returns y (N, H) and per-expert slot counts (E,).
        """
        order, counts = ops.sort_by_expert(expert_idx, self.num_experts)
        token_of_slot = token_idx[order]  # (M,) source token of each sorted slot
        y_sorted = ops.grouped_swiglu(x[token_of_slot], counts, self.w_gate, self.w_up, self.w_down)
        if weights is not None:
            y_sorted = y_sorted * weights[order].unsqueeze(-1).to(y_sorted.dtype)
        y = y_sorted.new_zeros(x.shape[0], x.shape[-1])
        y.index_add_(0, token_of_slot, y_sorted)
        return y, counts
