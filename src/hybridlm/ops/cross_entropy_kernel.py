"""One Triton pass from a chunk's logits to its cross-entropy and its logits gradient, in place:
the GPU inner step of `ops.linear_cross_entropy`.

The pure-torch chunk step makes an fp32 copy of the logits and then several passes over it
(log-sum-exp, gather, exp, scatter, mask, cast): on a GPU those passes cost more than the
matrix products. Here each row is read twice (its log-sum-exp in fp32, then softmax - onehot)
and written once, over the logits buffer itself, in the dtype the matrix product gave.

Glossary: C rows of the chunk, V vocabulary.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_VOCAB = 4096


@triton.jit
def _cross_entropy_grad_kernel(
    logits_ptr, targets_ptr, loss_ptr, stride_row, vocab, ignore_index,
    BLOCK_V: tl.constexpr,
):
    """Row r: loss[r] = logsumexp(x) - x[target] (0 when ignored); x <- softmax(x) - onehot
    (0 when ignored), in x's dtype. Arithmetic in fp32."""
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride_row
    target = tl.load(targets_ptr + row)
    cols = tl.arange(0, BLOCK_V)
    best = float("-inf")
    total = 0.0
    for start in range(0, vocab, BLOCK_V):
        x = tl.load(base + start + cols, mask=start + cols < vocab, other=float("-inf"))
        x = x.to(tl.float32)
        new_best = tl.maximum(best, tl.max(x, axis=0))
        total = total * tl.exp(best - new_best) + tl.sum(tl.exp(x - new_best), axis=0)
        best = new_best
    lse = best + tl.log(total)
    valid = target != ignore_index
    safe_target = tl.where(valid, target, 0)
    picked = tl.load(base + safe_target).to(tl.float32)
    tl.store(loss_ptr + row, tl.where(valid, lse - picked, 0.0))
    for start in range(0, vocab, BLOCK_V):
        in_row = start + cols < vocab
        x = tl.load(base + start + cols, mask=in_row, other=0.0).to(tl.float32)
        grad = tl.exp(x - lse) - tl.where(start + cols == safe_target, 1.0, 0.0)
        grad = tl.where(valid, grad, 0.0)
        tl.store(base + start + cols, grad.to(logits_ptr.dtype.element_ty), mask=in_row)


def cross_entropy_grad_(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int
                        ) -> torch.Tensor:
    """logits (C, V), last dimension contiguous, overwritten by d(sum of losses)/d(logits)
    (softmax - onehot; zero rows where targets (C,) == ignore_index). Returns the per-row
    losses (C,) fp32 (0 on ignored rows)."""
    if logits.stride(-1) != 1:
        raise ValueError("cross_entropy_grad_ needs the logits' last dimension contiguous")
    losses = torch.empty(logits.shape[0], device=logits.device, dtype=torch.float32)
    if logits.shape[0]:
        _cross_entropy_grad_kernel[(logits.shape[0],)](
            logits, targets, losses, logits.stride(0), logits.shape[1], ignore_index,
            BLOCK_V=min(BLOCK_VOCAB, triton.next_power_of_2(logits.shape[1])), num_warps=8,
        )
    return losses
