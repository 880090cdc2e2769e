"""Expert dispatch without host synchronisation: sorting slots by expert and the grouped
SwiGLU, with every shape fixed by the input sizes (never by the routing's counts).

`sort_by_expert` counts with a scatter-add over a fixed E, so nothing waits for the device.
`grouped_swiglu` picks one of three implementations (reference twins in ops/reference.py):

- `torch._grouped_mm` (CUDA, bf16 after autocast, sm90+, H and I multiples of 8): one
  grouped GEMM per projection, offsets read on the device, forward and backward.
- `grouped_swiglu_padded`: every expert gets a buffer of a static `capacity` rows (a bound on
  its slots that the router knows: N for top-k, C for capacity and expert choice), filled by
  a gather and computed with batched matmuls. Sync-free in any dtype and on any device, and
  what a compiled graph or a CUDA graph capture uses off the fast path
  (`dispatch.host_reads_allowed()` is False for both); it spends E * capacity / M times the
  FLOPs of the slots, so it is the fallback, not the fast path, except for a few slots
  (decode steps) on CUDA, where it is the faster one (`_padded_is_cheaper`).
- the reference loop, for eager CPU work: there reading the counts costs no device wait, and
  one matmul per expert is the fastest CPU formulation (measured on the demo's sizes).

Forced to the reference (`ops.use_impl("reference")`), a CUDA graph capture is refused with a
clear error: the loop and bincount read the counts on the host.

Glossary: M routed slots, E experts, H hidden, I expert width, C static rows per expert.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hybridlm.ops.dispatch import (
    current_impl,
    fast_path_enabled,
    host_reads_allowed,
    refuse_capture,
)
from hybridlm.ops.reference import grouped_swiglu_reference, sort_by_expert_reference


def sort_by_expert(expert_ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """expert_ids (M,) or (N, k) long in [0, E) -> order (M,), counts (E,) long.

    Same contract as `sort_by_expert_reference`; the counts come from a scatter-add into E
    fixed bins (bincount's output size depends on the data, so it waits for the device).
    """
    if current_impl() == "reference":
        refuse_capture("sort_by_expert")
        return sort_by_expert_reference(expert_ids, num_experts)
    flat = expert_ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = flat.new_zeros(num_experts).scatter_add_(0, flat, torch.ones_like(flat))
    return order, counts


# A decode step's few slots (tokens x top-k) are bound by reading expert weights. The grouped
# GEMMs read only the experts that have slots but cost a fixed ~15 us per layer (three
# `torch._grouped_mm` calls); the padded path reads every expert. So the CUDA dispatch takes
# the padded path for at most FEW_SLOTS slots when the weights it reads beyond the grouped
# GEMMs' take under ~15 us at the H100's ~2 TB/s: PADDED_EXTRA_BYTES. Measured on the H100,
# complexity-deep-187m (4 experts of 768 x 512) decoding at batch 1: 4.78 -> 4.55 ms a step.
# The padded path also computes every expert on all slots; PADDED_MAX_FLOPS keeps that
# under ~5 us of tensor-core time.
FEW_SLOTS = 64
PADDED_EXTRA_BYTES = 32 * 2**20
PADDED_MAX_FLOPS = 2.5e9


def _padded_is_cheaper(x_sorted: torch.Tensor, w_gate: torch.Tensor) -> bool:
    """Few slots, few enough idle experts that reading them costs less than the grouped
    GEMMs' fixed cost, and little padded arithmetic (shapes only: counts are never read)."""
    slots, (experts, hidden, width) = x_sorted.shape[0], w_gate.shape
    idle_experts = experts - min(experts, slots)  # at least this many hold no slot
    extra = idle_experts * 3 * hidden * width * w_gate.element_size()
    flops = 6 * experts * slots * hidden * width  # three (E, slots) x (H, I) products
    return slots <= FEW_SLOTS and extra <= PADDED_EXTRA_BYTES and flops <= PADDED_MAX_FLOPS


def grouped_swiglu(
    x_sorted: torch.Tensor,
    counts: torch.Tensor,
    w_gate: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    capacity: int | None = None,
    covers_all_rows: bool = False,
) -> torch.Tensor:
    """SwiGLU of each contiguous expert group: x_sorted (M, H), counts (E,) with
    sum(counts) <= M, w_gate/w_up (E, H, I), w_down (E, I, H) -> (M, H).

    Contract of `grouped_swiglu_reference`: rows past sum(counts) come back zero and pass no
    gradient. `capacity`: a static bound on every count (None: M), used by the padded path.
    `covers_all_rows`: the caller knows sum(counts) == M (nothing dropped), so the grouped
    GEMMs skip masking a tail that cannot exist.
    """
    if current_impl() == "reference":
        refuse_capture("grouped_swiglu")
        return grouped_swiglu_reference(x_sorted, counts, w_gate, w_up, w_down)
    if fast_path_enabled(x_sorted) and _padded_is_cheaper(x_sorted, w_gate):
        # Decode-sized: batched matrix-vector products beat the grouped GEMM's fixed cost.
        bound = x_sorted.shape[0] if capacity is None else min(capacity, x_sorted.shape[0])
        return grouped_swiglu_padded(x_sorted, counts, w_gate, w_up, w_down, bound)
    if _grouped_mm_usable(x_sorted, w_gate, w_down):
        return grouped_swiglu_grouped_mm(
            x_sorted, counts, w_gate, w_up, w_down, mask_tail=not covers_all_rows
        )
    # On CUDA the loop's count reads would wait for the device; compiled and captured graphs
    # may not read at all. Only eager CPU work takes the loop.
    if x_sorted.is_cuda or not host_reads_allowed():
        bound = x_sorted.shape[0] if capacity is None else min(capacity, x_sorted.shape[0])
        return grouped_swiglu_padded(x_sorted, counts, w_gate, w_up, w_down, bound)
    return grouped_swiglu_reference(x_sorted, counts, w_gate, w_up, w_down)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a matmul of x runs in: autocast's, when autocast is on for x's device."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def _grouped_mm_usable(x: torch.Tensor, w_gate: torch.Tensor, w_down: torch.Tensor) -> bool:
    """torch._grouped_mm runs its sync-free CUTLASS kernel only for bf16 on sm90+ with rows
    16-byte aligned; anything else takes torch's fallback, which copies the offsets to the host."""
    if not (fast_path_enabled(x) and hasattr(torch, "_grouped_mm")):
        return False
    aligned = w_gate.shape[1] % 8 == 0 and w_down.shape[1] % 8 == 0
    return aligned and _compute_dtype(x) == torch.bfloat16 and _is_sm90_or_newer(x.device.index)


@torch.compiler.assume_constant_result
def _is_sm90_or_newer(device_index: int | None) -> bool:
    # A constant for the compiler: the device does not change inside a graph.
    return torch.cuda.get_device_capability(device_index) >= (9, 0)


def grouped_swiglu_grouped_mm(
    x_sorted: torch.Tensor,
    counts: torch.Tensor,
    w_gate: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    mask_tail: bool = True,
) -> torch.Tensor:
    """The grouped-GEMM implementation (CUDA, bf16): three `torch._grouped_mm` calls.

    `_grouped_mm` leaves rows past the last offset uninitialised, in its output and in its
    input gradient, so with `mask_tail` those rows are masked on the way in and out
    (`torch.where`, which selects and never multiplies garbage); without it the caller
    promises there are none."""
    dtype = _compute_dtype(x_sorted)
    offsets = counts.cumsum(0).to(torch.int32)  # (E,) end of each expert's rows
    x = x_sorted.to(dtype)  # (M, H)
    if mask_tail:
        rows = torch.arange(x.shape[0], device=x.device)
        valid = (rows < offsets[-1])[:, None]  # (M, 1)
        x = torch.where(valid, x, 0)
    gate = torch._grouped_mm(x, w_gate.to(dtype), offs=offsets)  # (M, I)
    up = torch._grouped_mm(x, w_up.to(dtype), offs=offsets)  # (M, I)
    y = torch._grouped_mm(F.silu(gate) * up, w_down.to(dtype), offs=offsets)  # (M, H)
    return torch.where(valid, y, 0) if mask_tail else y


def grouped_swiglu_padded(
    x_sorted: torch.Tensor,
    counts: torch.Tensor,
    w_gate: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    capacity: int,
) -> torch.Tensor:
    """The sync-free pure-torch implementation: expert e's slots gathered into rows
    [0, counts[e]) of an (E, C, H) buffer (C = capacity >= every count, static), the SwiGLU as
    three batched matmuls, the results scattered back. Padding rows read a zero row, and
    SwiGLU(0) = 0, so they add nothing anywhere."""
    num_slots, hidden = x_sorted.shape
    num_experts = counts.shape[0]
    starts = counts.cumsum(0) - counts  # (E,) first sorted row of each expert
    column = torch.arange(capacity, device=x_sorted.device)  # (C,)
    index = torch.where(column < counts[:, None], starts[:, None] + column, num_slots)  # (E, C)
    x_ext = torch.cat([x_sorted, x_sorted.new_zeros(1, hidden)])  # (M + 1, H), zero row last
    x_pad = x_ext[index]  # (E, C, H)
    hidden_act = F.silu(torch.bmm(x_pad, w_gate)) * torch.bmm(x_pad, w_up)  # (E, C, I)
    y_pad = torch.bmm(hidden_act, w_down)  # (E, C, H)
    out = y_pad.new_zeros(num_slots + 1, hidden)
    out = out.index_add(0, index.reshape(-1), y_pad.reshape(num_experts * capacity, hidden))
    return out[:num_slots]  # (M, H)
