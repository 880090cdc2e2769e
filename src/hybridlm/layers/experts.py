"""GroupedExperts: the one module that computes any routing's result.

A router (token-routed table, learned top-k, expert choice) only decides a `Routing` (slots:
token, expert, weight; layers/routing.py); this module sorts the routed slots by expert,
runs each expert on its contiguous group (offsets from the real per-expert counts) and
scatters the weighted results back to their tokens.

Nothing here reads a count on the host: every shape is fixed by N and M, dropped slots (expert
index E) sort behind the last expert into a bin no expert computes, and the grouped SwiGLU
(`ops.grouped_swiglu`) takes its offsets on the device. So a block compiles with
`fullgraph=True` and a CUDA graph can capture it.

Glossary: N tokens, M routed slots, E experts, H hidden, I expert width.
"""

from __future__ import annotations

import torch
from torch import nn

from hybridlm import ops
from hybridlm.layers.routing import Routing


class GroupedExperts(nn.Module):
    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.num_experts = num_experts
        # Stacked SwiGLU weights, laid out for x @ W (so a grouped GEMM can use them as is).
        self.w_gate = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        self.w_up = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        self.w_down = nn.Parameter(torch.empty(num_experts, intermediate_size, hidden_size))

    def forward(self, x: torch.Tensor, routing: Routing) -> tuple[torch.Tensor, torch.Tensor]:
        """x (N, H), routing with M slots -> y (N, H) and the per-expert slot counts (E,).

        y[n] = sum over slots m of token n: weights[m] * Expert[expert_idx[m]](x[n]); a token
        in no slot gets y = 0, and a dropped slot (expert_idx = E) adds nothing.
        """
        if routing.num_experts != self.num_experts:
            raise ValueError(
                f"routing.num_experts={routing.num_experts} but this layer has "
                f"{self.num_experts} experts"
            )
        experts = self.num_experts
        bins = experts + 1 if routing.may_drop else experts  # bin E: the dropped slots
        order, counts = ops.sort_by_expert(routing.expert_idx, bins)
        counts = counts[:experts]  # (E,)
        token_of_slot = routing.token_idx[order]  # (M,) source token of each sorted slot
        y_sorted = ops.grouped_swiglu(  # (M, H), zero past the kept slots
            x[token_of_slot], counts, self.w_gate, self.w_up, self.w_down, routing.capacity,
            covers_all_rows=not routing.may_drop,
        )
        if routing.top_k is not None:
            return self._combine_token_major(y_sorted, order, routing), counts
        if routing.weights is not None:
            y_sorted = y_sorted * routing.weights[order].unsqueeze(-1).to(y_sorted.dtype)
        y = y_sorted.new_zeros(x.shape[0], x.shape[-1])
        return y.index_add(0, token_of_slot, y_sorted), counts

    @staticmethod
    def _combine_token_major(
        y_sorted: torch.Tensor, order: torch.Tensor, routing: Routing
    ) -> torch.Tensor:
        """Token-major slots (token n owns slots n*k .. n*k + k - 1): put every result back in
        its slot (a permutation, no atomic adds, deterministic) and sum each token's k slots."""
        top_k, hidden = routing.top_k, y_sorted.shape[-1]
        y_slots = torch.empty_like(y_sorted).index_copy(0, order, y_sorted)  # (M, H) slot order
        if routing.weights is not None:
            y_slots = y_slots * routing.weights.unsqueeze(-1).to(y_slots.dtype)
        if top_k == 1:
            return y_slots  # (N, H): one slot per token (token-routed)
        return y_slots.view(-1, top_k, hidden).sum(dim=1)  # (N, H)

    @torch.no_grad()
    def init_stacked_weights(self, std: float, out_std: float) -> None:
        """Normal(0, std) inputs, Normal(0, out_std) output projection (HybridLM.init_weights
        calls this: the stacked weights are no nn.Linear its generic init would see)."""
        nn.init.normal_(self.w_gate, 0.0, std)
        nn.init.normal_(self.w_up, 0.0, std)
        nn.init.normal_(self.w_down, 0.0, out_std)

    def parameters_per_expert(self) -> int:
        """Parameters of one expert (the stacked weights' slice along the expert axis)."""
        return sum(p[0].numel() for p in self.parameters())

    def unused_parameters(self, active_experts_per_token: float) -> float:
        """Expert parameters one token does not use when it visits that many experts."""
        return (self.num_experts - active_experts_per_token) * self.parameters_per_expert()
