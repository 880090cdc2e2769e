"""Token-Routed MLP (Complexity-Deep 3.2): the expert is chosen by the token id alone.

expert = table[token_id], one expert per token, plus the shared experts every token passes
through (layers/mlp.SharedExperts, as on learned-MoE layers): y = shared(x) + expert(x).
The table is a persistent buffer, so a saved and reloaded model routes exactly as the
trained one did.
"""

from __future__ import annotations

import torch
from torch import nn

from hybridlm.config import TR_ROUTINGS
from hybridlm.layers.experts import GroupedExperts
from hybridlm.layers.mlp import SharedExperts
from hybridlm.layers.routing import Router, Routing
from hybridlm.layers.routing_tables import modulo_routing_table, zipf_routing_table


class TokenRoutedRouter(Router):
    """token_ids (B, T) -> Routing with one slot per token, weight 1: a table lookup, no
    learned parameters."""

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

    def forward(self, token_ids: torch.Tensor) -> Routing:
        expert_ids = self.table[token_ids.reshape(-1)].unsqueeze(-1)  # (N, 1)
        # One slot per token, weight 1: the experts put results back by a permutation.
        return Routing.token_choice(expert_ids, self.num_experts, distinct=True)


def corpus_counts(token_counts: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """(n,) counts with n <= vocab_size -> (vocab_size,) float64, unseen ids counted 0."""
    counts = torch.zeros(vocab_size, dtype=torch.float64)
    given = torch.as_tensor(token_counts, dtype=torch.float64).reshape(-1)
    if given.numel() > counts.numel():
        raise ValueError(f"token_counts has {given.numel()} entries but vocab_size={vocab_size}")
    counts[: given.numel()] = given
    return counts


class TokenRoutedMLP(nn.Module):
    """Token-routed experts with the shared MLP interface: forward(x, *, token_ids) -> (y, stats).

    `tr_routing` ("modulo" | "zipf"): the table the layer wants from the corpus; "zipf" is
    installed by `fit_to_corpus` (the trainer, from the prepared data's token counts).
    `num_shared_experts` shared experts of `shared_expert_size` each (None: as wide as a
    routed expert). No balancing state: the table fixes the loads.
    """

    def __init__(
        self,
        hidden_size: int,
        expert_intermediate_size: int,
        num_experts: int,
        vocab_size: int,
        num_shared_experts: int = 1,
        shared_expert_size: int | None = None,
        tr_routing: str = "modulo",
    ) -> None:
        super().__init__()
        if tr_routing not in TR_ROUTINGS:
            raise ValueError(f"tr_routing={tr_routing!r} is not one of {list(TR_ROUTINGS)}")
        self.active_experts_per_token = 1
        self.tr_routing = tr_routing
        self.router = TokenRoutedRouter(vocab_size, num_experts)
        self.experts = GroupedExperts(num_experts, hidden_size, expert_intermediate_size)
        self.shared = SharedExperts.build(hidden_size, num_shared_experts,
                                          shared_expert_size or expert_intermediate_size)

    def forward(
        self, x: torch.Tensor, *, token_ids: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """x (B, T, H), token_ids (B, T) -> y (B, T, H), stats {"expert_counts": (E,)}."""
        if token_ids is None:
            raise ValueError(
                "a token-routed layer (mlp letter T) needs the token ids to pick each token's "
                "expert; "
                "pass token_ids (the model does this from input_ids)"
            )
        if token_ids.shape != x.shape[:-1]:
            raise ValueError(
                f"token_ids shape {tuple(token_ids.shape)} does not match x {tuple(x.shape[:-1])}"
            )
        flat = x.reshape(-1, x.shape[-1])  # (N, H)
        y, counts = self.experts(flat, self.router(token_ids))
        if self.shared is not None:
            y = y + self.shared(flat)
        return y.view_as(x), {"expert_counts": counts}

    # --- the ExpertMLP and TokenTableRouted protocols (layers/routing.py) ---------------------
    def inactive_parameters(self) -> float:
        return self.experts.unused_parameters(self.active_experts_per_token)

    def set_routing_table(self, table: torch.Tensor) -> None:
        self.router.set_table(table)

    def set_token_counts(
        self, counts: torch.Tensor, memo: dict[int, torch.Tensor] | None = None
    ) -> None:
        """Install the frequency-balanced table of corpus counts (n,), n <= vocab_size."""
        memo = {} if memo is None else memo
        experts = self.router.num_experts
        if experts not in memo:
            memo[experts] = zipf_routing_table(
                corpus_counts(counts, self.router.table.numel()), experts
            )
        self.router.set_table(memo[experts])

    def fit_to_corpus(
        self, counts: torch.Tensor, memo: dict[int, torch.Tensor] | None = None
    ) -> None:
        if self.tr_routing == "zipf":
            self.set_token_counts(counts, memo)
