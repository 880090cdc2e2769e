"""Token-Routed MLP (Complexity-Deep 3.2): the expert is chosen by the token id alone.

expert = table[token_id], one expert per token, plus an optional shared SwiGLU every token
passes through: y = shared(x) + expert(x). The table is a persistent buffer, so a saved and
reloaded model routes exactly as the trained one did.
"""

from __future__ import annotations

import torch
from torch import nn

from hybridlm.layers.experts import GroupedExperts
from hybridlm.layers.mlp import SwiGLU
from hybridlm.layers.routing_tables import modulo_routing_table


class TokenRoutedRouter(nn.Module):
    """Returns (expert_ids (N, 1), weights None): a table lookup, no learned parameters."""

    def __init__(self, vocab_size: int, num_experts: int) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.register_buffer("table", modulo_routing_table(vocab_size, num_experts))

    def set_table(self, table: torch.Tensor) -> None:
        table = torch.as_tensor(table, dtype=torch.long)
        if table.shape != self.table.shape:
            raise ValueError(
                f"routing table has shape {tuple(table.shape)}, expected {tuple(self.table.shape)}"
            )
        if table.numel() and (int(table.min()) < 0 or int(table.max()) >= self.num_experts):
            raise ValueError(f"routing table entries must lie in [0, {self.num_experts})")
        self.table.copy_(table)

    def forward(self, token_ids: torch.Tensor) -> tuple[torch.Tensor, None]:
        return self.table[token_ids.reshape(-1)].unsqueeze(-1), None


class TokenRoutedMLP(nn.Module):
    def __init__(
        self,
        hidden_size: int,
        expert_intermediate_size: int,
        num_experts: int,
        vocab_size: int,
        shared_intermediate_size: int | None,
    ) -> None:
        super().__init__()
        self.active_experts_per_token = 1
        self.router = TokenRoutedRouter(vocab_size, num_experts)
        self.experts = GroupedExperts(num_experts, hidden_size, expert_intermediate_size)
        self.shared = (
            SwiGLU(hidden_size, shared_intermediate_size) if shared_intermediate_size else None
        )

    def forward(
        self, x: torch.Tensor, *, token_ids: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """x (B, T, H), token_ids (B, T) -> y (B, T, H), stats {"expert_counts": (E,)}."""
        if token_ids is None:
            raise ValueError(
                "mlp_type='token_routed' needs the token ids to pick each token's expert; "
                "pass token_ids (the model does this from input_ids)"
            )
        if token_ids.shape != x.shape[:-1]:
            raise ValueError(
                f"token_ids shape {tuple(token_ids.shape)} does not match x {tuple(x.shape[:-1])}"
            )
        flat = x.reshape(-1, x.shape[-1])  # (N, H)
        expert_ids, weights = self.router(token_ids)
        y, counts = self.experts(flat, expert_ids, weights)
        if self.shared is not None:
            y = y + self.shared(flat)
        return y.view_as(x), {"expert_counts": counts}
