"""Token-to-expert tables for the Token-Routed MLP (expert = table[token_id]).

`modulo_routing_table`: id mod E (paper eq. 1) — equal token COUNTS per expert, but frequent
tokens pile up wherever they happen to land.
`zipf_routing_table`: greedy bin packing of the vocabulary sorted by corpus frequency, each
token to the currently least-loaded expert — equal frequency MASS per expert.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence

import torch


def modulo_routing_table(vocab_size: int, num_experts: int) -> torch.Tensor:
    """(vocab_size,) long: token id -> id mod num_experts."""
    return torch.arange(vocab_size, dtype=torch.long) % num_experts


def zipf_routing_table(
    token_counts: Sequence[int] | torch.Tensor, num_experts: int
) -> torch.Tensor:
    """Frequency-balanced table from corpus counts.

    token_counts: (vocab_size,) non-negative counts of each token id in the training data.
    Returns (vocab_size,) long expert ids. Tokens are visited in descending frequency (ties by
    id, so the table is deterministic) and each goes to the expert with the least mass so far;
    ties between experts go to the one holding fewer tokens, so unseen (zero-count) tokens are
    spread evenly instead of all landing on one expert. O(V log V + V log E).
    """
    counts = torch.as_tensor(token_counts).to(torch.float64).reshape(-1)
    if num_experts < 1:
        raise ValueError(f"num_experts={num_experts} must be >= 1")
    if counts.numel() == 0:
        raise ValueError("token_counts is empty; expected one count per vocabulary id")
    if bool((counts < 0).any()):
        raise ValueError("token_counts must be non-negative")
    # Descending by count, ascending by id among equal counts (stable sort on -count).
    order = torch.argsort(-counts, stable=True).tolist()
    mass = counts.tolist()
    table = [0] * len(mass)
    heap = [(0.0, 0, expert) for expert in range(num_experts)]  # (mass, n_tokens, expert)
    for token in order:
        load, n_tokens, expert = heapq.heappop(heap)
        table[token] = expert
        heapq.heappush(heap, (load + mass[token], n_tokens + 1, expert))
    return torch.tensor(table, dtype=torch.long)


def expert_mass(table: torch.Tensor, token_counts: torch.Tensor, num_experts: int) -> torch.Tensor:
    """(E,) total frequency mass each expert receives under `table`."""
    counts = torch.as_tensor(token_counts).to(torch.float64)
    return torch.zeros(num_experts, dtype=torch.float64).index_add_(0, table, counts)
