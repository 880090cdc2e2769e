"""Pure-torch reference implementations of the expert ops.

The readable definitions: one Python step per expert, counts read on the host. Every fast
implementation (ops/grouped.py) has its twin here and a parity test against it;
`ops.use_impl("reference")` makes the public ops run these.

Glossary: N tokens, k experts per token, E experts, H hidden, I expert width,
M = N*k routed (token, expert) slots.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sort_by_expert_reference(
    expert_ids: torch.Tensor, num_experts: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Order the routed slots by expert.

    expert_ids: (M,) or (N, k) long in [0, E) — one entry per routed slot.
    Returns order (M,) — indices into the flattened slots, grouped by expert, stable
    within an expert — and counts (E,) — how many slots each expert received. Expert e owns
    the sorted slots [offsets[e], offsets[e] + counts[e]) with offsets = cumsum(counts) - counts:
    dispatch follows the real counts, never equal N/E splits.
    """
    flat = expert_ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts)
    return order, counts


def grouped_swiglu_reference(
    x_sorted: torch.Tensor,
    counts: torch.Tensor,
    w_gate: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
) -> torch.Tensor:
    """SwiGLU of each contiguous expert group.

    x_sorted: (M, H) slots grouped by expert; counts: (E,) with sum(counts) <= M; w_gate,
    w_up: (E, H, I); w_down: (E, I, H). Returns (M, H); the tail rows past sum(counts) (slots
    no expert takes) come back zero and pass no gradient. Experts with zero slots are skipped
    (and get a zero gradient only in that step, as they should).
    """
    outputs = []
    start = 0
    for expert, count in enumerate(counts.tolist()):
        if count == 0:
            continue
        xe = x_sorted[start : start + count]  # (count, H)
        hidden = F.silu(xe @ w_gate[expert]) * (xe @ w_up[expert])  # (count, I)
        outputs.append(hidden @ w_down[expert])  # (count, H)
        start += count
    if start < x_sorted.shape[0] or not outputs:
        dtype = outputs[0].dtype if outputs else x_sorted.dtype
        tail = x_sorted.shape[0] - start  # slots no expert takes (dropped by capacity)
        outputs.append(x_sorted.new_zeros(tail, x_sorted.shape[1], dtype=dtype))
    return torch.cat(outputs, dim=0)
