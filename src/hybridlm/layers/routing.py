"""The router contract: one `Routing` value from every router, and the protocols expert MLPs
expose to the model (balancing, active parameters, token tables).

A router (learned top-k, expert choice, a token table, or one of your own) maps N tokens to
M routed slots: slot m sends token `token_idx[m]` to expert `expert_idx[m]` with weight
`weights[m]`. `GroupedExperts` computes any `Routing` and reads nothing else, so a new router
never touches the expert code; the statistics fields feed balancing and logging.

The model never looks inside an MLP: it calls the protocols below on every module that
implements them (`isinstance` on a runtime-checkable Protocol checks only that the methods
exist), so a new expert MLP takes part in balancing and active-parameter counts by defining
the methods.

Glossary: N tokens, M routed slots, E experts, k experts per token.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import nn


def count_per_expert(expert_idx: torch.Tensor, num_experts: int) -> torch.Tensor:
    """(M,) long in [0, E) -> (E,) long slots per expert: a scatter-add into E fixed bins
    (bincount's output size depends on the data, so it would wait for the device)."""
    ones = torch.ones_like(expert_idx)
    return expert_idx.new_zeros(num_experts).scatter_add_(0, expert_idx, ones)


@dataclass
class Routing:
    """Where each routed slot goes. Slots may come in any order and any number per token
    (a token in no slot gets only what the MLP adds besides its routed experts).

    token_idx, expert_idx: (M,) long. With `may_drop`, expert_idx may hold E (one past the
    last expert): the slot is dropped (capacity), computes nothing and adds nothing. M never
    depends on the routing's values, so routing needs no host synchronisation and compiles.
    weights: (M,) or None (every slot weighs 1).
    num_experts: E. probs: (N, E) float32 router scores (learned routers; aux loss, entropy).
    selected: (E,) long, the slots each expert was chosen for before any capacity dropped
    some (the load that balancing evens out). dropped: () long, slots dropped by capacity.
    expert_ids: (N, k) each token's choices before capacity (token choice only), else None.
    top_k: k when the slots are token-major (token n owns slots n*k .. n*k + k - 1), which
    lets the experts combine a token's slots without atomic adds; None: any order.
    capacity: a bound on the slots one expert takes, known without reading the routing
    (N for distinct top-k choices, C under capacity or expert choice); None: M.
    may_drop: some slots may go to the drop bin (set by `keep`); False lets the experts skip
    handling that bin.
    """

    token_idx: torch.Tensor
    expert_idx: torch.Tensor
    weights: torch.Tensor | None
    num_experts: int
    probs: torch.Tensor | None = None
    selected: torch.Tensor | None = None
    dropped: torch.Tensor | None = None
    expert_ids: torch.Tensor | None = None
    top_k: int | None = None
    capacity: int | None = None
    may_drop: bool = False

    @classmethod
    def token_choice(
        cls, expert_ids: torch.Tensor, num_experts: int, weights: torch.Tensor | None = None,
        probs: torch.Tensor | None = None, distinct: bool = False,
    ) -> Routing:
        """expert_ids (N, k), weights (N, k) or None -> token-major slots: token n's k slots
        are n*k .. n*k + k - 1, nothing dropped. `distinct`: a token's k experts differ (as
        top-k's do), so no expert takes more than N slots."""
        num_tokens, top_k = expert_ids.shape
        token_idx = torch.arange(num_tokens, device=expert_ids.device).repeat_interleave(top_k)
        expert_idx = expert_ids.reshape(-1)
        return cls(
            token_idx, expert_idx, None if weights is None else weights.reshape(-1), num_experts,
            probs=probs, selected=count_per_expert(expert_idx, num_experts),
            dropped=torch.zeros((), dtype=torch.long, device=expert_ids.device),
            expert_ids=expert_ids, top_k=top_k, capacity=num_tokens if distinct else None,
        )

    def keep(self, mask: torch.Tensor, capacity: int | None = None) -> Routing:
        """Only the slots where mask (M,) bool is True; `selected` still counts them all.

        The other slots go to the drop bin E with weight 0, so M and the slot order stay as
        they are. `capacity`: the bound the mask enforces on every expert, if any."""
        weights = None if self.weights is None else torch.where(mask, self.weights, 0.0)
        return dataclasses.replace(
            self, expert_idx=torch.where(mask, self.expert_idx, self.num_experts),
            weights=weights, dropped=(~mask).sum(), may_drop=True,
            capacity=self.capacity if capacity is None else capacity,
        )


class Router(nn.Module):
    """Base class of routers: forward(...) -> Routing.

    `fp32_parameters`: names of this module's parameters or child modules that FSDP keeps in
    fp32 under a low-precision policy (parallel/data_parallel.py): list learned gates, whose
    discrete top-k decisions bf16 rounding would flip. `is_causal`: False when a token's slots
    depend on later tokens (expert choice), so the model refuses cached decoding.
    `experts_per_token`: routed experts one token uses on average (active-parameter counts).

    A router of learned-MoE layers (a `moe_router` name, hybridlm.registry) is built by
    `builder(config, num_experts)`, reads x (N, H) and returns a Routing with `probs` (N, E)
    and `selected`; its `score` ("softmax" | "sigmoid") says how probs normalise over the
    experts (aux loss, entropy), and an `expert_bias` (E,) buffer, if it has one, is what
    aux_free / ema balancing moves.
    """

    fp32_parameters: tuple[str, ...] = ()
    experts_per_token: float = 1.0

    @property
    def is_causal(self) -> bool:
        return True


@runtime_checkable
class ExpertMLP(Protocol):
    """An MLP with routed experts. `inactive_parameters()`: parameters one token does not use
    (on average), subtracted by `HybridLM.num_parameters(active=True)`."""

    def inactive_parameters(self) -> float: ...


@runtime_checkable
class LoadBalanced(Protocol):
    """An MLP that evens out its expert loads between optimizer steps.

    Training forwards add each expert's selected slots to a pending load (E,);
    `HybridLM.balance_step` sums `pending_load()` over data-parallel ranks and hands it to
    `apply_balance(load)`, which moves the balancing state and resets the pending load;
    `discard_loads()` resets it without an update (a skipped step). An aux loss, if any, is
    returned in the forward's stats as "aux_loss" and added to the loss by the model.
    """

    def pending_load(self) -> torch.Tensor: ...

    def apply_balance(self, load: torch.Tensor) -> None: ...

    def discard_loads(self) -> None: ...


@runtime_checkable
class TokenTableRouted(Protocol):
    """An MLP whose experts are chosen by token id from a (V,) table.

    `set_routing_table(table)` installs a table; `set_token_counts(counts, memo)` installs the
    frequency-balanced (Zipf) table of corpus counts (V,) (memo: tables already built, by
    expert count, shared across layers); `fit_to_corpus(counts, memo)` does that only when
    the layer's configured routing asks for it (the trainer calls it for every run).
    """

    def set_routing_table(self, table: torch.Tensor) -> None: ...

    def set_token_counts(
        self, counts: torch.Tensor, memo: dict[int, torch.Tensor] | None = None
    ) -> None: ...

    def fit_to_corpus(
        self, counts: torch.Tensor, memo: dict[int, torch.Tensor] | None = None
    ) -> None: ...
