"""Selective scan of the Mamba-1 SSM (Gu & Dao 2023, Algorithm 2), pure PyTorch.

For every channel d and state index n, with an input-dependent step size delta_t:

    dA_t = exp(delta_t * A)                   in (0, 1], since A < 0 and delta > 0
    h_t  = dA_t * h_{t-1} + delta_t * B_t * u_t
    y_t  = sum_n h_t[n] * C_t[n] + D * u_t

Three entry points:
- `selective_scan_step`: one time step (token-by-token decoding).
- `selective_scan_sequential`: a loop of steps over time; the test reference only.
- `selective_scan_chunked`: the production op. Time is cut into chunks; inside a chunk the
  recurrence is solved by a log-depth parallel scan, and a Python loop runs over chunks only.
  A hand-written backward recomputes each chunk's states from the state saved at its start, so
  backward keeps only (Bt, L, Din)-sized inputs plus one (Bt, Din, N) state per chunk, and at
  most a few (Bt, Lc, N, Din) tensors are alive at once: time and memory linear in L.

Inside the chunked op, states are laid out (Bt, Lc, N, Din), channels innermost: every
contraction (over N or over Din) is then a broadcast multiply and a sum over a long contiguous
or outer axis, several times faster on CPU than einsum's batched tiny matmuls.

Both scans take an optional `reset` (Bt, L) bool: where True, the state carried in from
before step t is dropped (dA_t is replaced by 0), so h_t = delta_t * B_t * u_t starts afresh.
Packed rows use it at the first token of each example.

Everything is computed in fp32 (fp64 inputs stay fp64, for gradcheck); y comes back in u's
dtype and the last state in the compute dtype.

Glossary: Bt batch, L sequence length, Din inner channels, N state size per channel,
Lc chunk length (the last chunk may be shorter), K number of chunks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)  # bf16/fp16/fp32 -> fp32; fp64 kept


def selective_scan_step(
    h: Tensor, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor
) -> tuple[Tensor, Tensor]:
    """One time step of the recurrence.

    h: (Bt, Din, N) state before the step; u, delta: (Bt, Din); A: (Din, N); B, C: (Bt, N);
    D: (Din,). Returns y (Bt, Din) in u's dtype and the new state (Bt, Din, N) in the compute
    dtype.
    """
    dtype = _compute_dtype(u.dtype)
    h, uf, delta, A, B, C, D = (t.to(dtype) for t in (h, u, delta, A, B, C, D))
    dA = torch.exp(delta[:, :, None] * A)  # (Bt, Din, N)
    dBu = (delta * uf)[:, :, None] * B[:, None, :]  # (Bt, Din, N)
    h = dA * h + dBu
    y = (h * C[:, None, :]).sum(dim=-1) + D * uf  # (Bt, Din)
    return y.to(u.dtype), h


def selective_scan_sequential(
    u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor, h0: Tensor | None = None,
    reset: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Reference scan, one Python step per time step (slow; tests only).

    u, delta: (Bt, L, Din); A: (Din, N); B, C: (Bt, L, N); D: (Din,); h0: (Bt, Din, N) or None
    (zeros); reset: (Bt, L) bool or None (see the module doc). Returns y (Bt, L, Din) in u's
    dtype and h_last (Bt, Din, N).
    """
    batch, length, inner = u.shape
    dtype = _compute_dtype(u.dtype)
    h = u.new_zeros(batch, inner, A.shape[1], dtype=dtype) if h0 is None else h0.to(dtype)
    ys = []
    for t in range(length):
        if reset is not None:
            h = h * (~reset[:, t, None, None]).to(dtype)
        y, h = selective_scan_step(h, u[:, t], delta[:, t], A, B[:, t], C[:, t], D)
        ys.append(y)
    return torch.stack(ys, dim=1), h


def selective_scan_chunked(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor,
    h0: Tensor | None = None,
    chunk_size: int = 64,
    reset: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Chunked parallel scan, differentiable in every input (h0 included; `reset` is a mask).

    Same shapes and result as `selective_scan_sequential`. `chunk_size` bounds the working
    set ((Bt, chunk_size, N, Din) blocks) and sets the number of Python iterations (L / Lc);
    any L >= 1 works, divisible or not.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be >= 1")
    batch, length, inner = u.shape
    if length < 1:
        raise ValueError("selective_scan_chunked needs at least one time step (L >= 1)")
    dtype = _compute_dtype(u.dtype)
    if h0 is None:
        h0 = u.new_zeros(batch, inner, A.shape[1], dtype=dtype)
    # Transposed to the channels-last layout of the op: A (N, Din), h0 (Bt, N, Din).
    inputs = (t.to(dtype).contiguous() for t in (u, delta, A.T, B, C, D, h0.transpose(1, 2)))
    # keep = 1 - reset multiplies the decays; None keeps the op exactly as without resets.
    keep = None if reset is None else (~reset.bool()).to(dtype).contiguous()  # (Bt, L)
    y, h_last = _ChunkedScan.apply(*inputs, chunk_size, keep)
    return y.to(u.dtype), h_last.transpose(1, 2).contiguous()


def _linear_scan(decay: Tensor, b: Tensor) -> Tensor:
    """Solve x_0 = b_0, x_t = a_t * x_{t-1} + b_t along dim 1; returns x (a new tensor).

    b: (Bt, Lc, N, Din); decay: (Bt, Lc - 1, N, Din) holds a_1 .. a_{Lc-1} (the links between
    consecutive steps). Odd-even reduction: fold each pair of steps (2k, 2k+1) into one step,
    solve the half-length problem for the odd steps recursively, then fill in the even steps
    from their odd predecessors. Work O(Lc) over log2(Lc) levels. Only products of decays in
    (0, 1] and sums appear, so nothing can overflow however large delta * |A| is (unlike
    exp(-cumsum) formulations).
    """
    length = b.shape[1]
    if length == 1:
        return b
    b_even, b_odd = b[:, 0::2], b[:, 1::2]
    n_even, n_odd = b_even.shape[1], b_odd.shape[1]
    a_odd = decay[:, 0::2]  # a_{2k+1}, k = 0 .. n_odd-1: links even -> odd inside a pair
    a_even = decay[:, 1::2]  # a_{2k}, k = 1 .. n_even-1: links between pairs
    pair_b = torch.addcmul(b_odd, a_odd, b_even[:, :n_odd])  # b_{2k+1} + a_{2k+1} b_{2k}
    pair_decay = a_odd[:, 1:] * a_even[:, : n_odd - 1]  # a_{2k+1} a_{2k}, k >= 1
    x_odd = _linear_scan(pair_decay, pair_b)  # (Bt, n_odd, N, Din)
    x = torch.empty_like(b)
    x[:, 1::2] = x_odd
    x[:, 0] = b[:, 0]
    _store(x[:, 2::2], torch.addcmul, b_even[:, 1:], a_even, x_odd[:, : n_even - 1])
    return x


def _store(dst: Tensor, op: Callable[..., Tensor], *args: Tensor) -> None:
    """dst[...] = op(*args). Eager mode writes through `out=`, with no temporary; dynamo
    refuses `out=` into a strided view, so a compiled graph copies (inductor fuses it)."""
    if torch.compiler.is_compiling():
        dst.copy_(op(*args))
    else:
        op(*args, out=dst)


def _chunk_states(
    u: Tensor, delta: Tensor, A_t: Tensor, B: Tensor, h_in: Tensor, keep: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """States of one chunk. u, delta: (Bt, Lc, Din); A_t: (N, Din); B: (Bt, Lc, N); h_in:
    (Bt, N, Din) the state before the chunk; keep: (Bt, Lc) 0 where the state resets, or None.
    Returns the decays actually applied, dA * keep, and the states h, (Bt, Lc, N, Din)."""
    dA = torch.exp(delta[:, :, None, :] * A_t)  # (Bt, Lc, N, Din)
    if keep is not None:
        # A reset decay is a constant 0, so everything downstream (the scan, and in backward
        # the adjoint scan and d(dA)/d(delta A) = dA) sees it with no further special case.
        dA = dA * keep[:, :, None, None]
    dBu = B[..., None] * (delta * u)[:, :, None, :]  # (Bt, Lc, N, Din)
    dBu[:, 0] += dA[:, 0] * h_in  # fold the carried state into the first step
    return dA, _linear_scan(dA[:, 1:], dBu)


def _chunks(length: int, chunk_size: int) -> list[slice]:
    return [slice(lo, min(lo + chunk_size, length)) for lo in range(0, length, chunk_size)]


class _ChunkedScan(torch.autograd.Function):
    """Channels-last core: u, delta (Bt, L, Din); A_t (N, Din); B, C (Bt, L, N); D (Din,);
    h0 (Bt, N, Din); all contiguous and in the compute dtype (see `selective_scan_chunked`)."""

    @staticmethod
    def forward(
        ctx: Any, u: Tensor, delta: Tensor, A_t: Tensor, B: Tensor, C: Tensor, D: Tensor,
        h0: Tensor, chunk_size: int, keep: Tensor | None,
    ) -> tuple[Tensor, Tensor]:
        y = torch.empty_like(u)  # (Bt, L, Din)
        h = h0
        starts = []  # state entering each chunk: all that backward needs to rebuild the states
        for sl in _chunks(u.shape[1], chunk_size):
            starts.append(h)
            keep_c = keep[:, sl] if keep is not None else None
            _, states = _chunk_states(u[:, sl], delta[:, sl], A_t, B[:, sl], h, keep_c)
            y[:, sl] = (states * C[:, sl, :, None]).sum(dim=2)  # sum over N
            h = states[:, -1].clone()  # a copy, so this chunk's states can be freed
        y += D * u
        ctx.save_for_backward(u, delta, A_t, B, C, D, torch.stack(starts))  # (K, Bt, N, Din)
        ctx.chunk_size = chunk_size
        ctx.keep = keep  # a mask, not differentiated
        return y, h

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_y: Tensor, grad_h_last: Tensor) -> tuple[Tensor | None, ...]:
        u, delta, A_t, B, C, D, starts = ctx.saved_tensors
        grad_y = grad_y.contiguous()
        grad_u = grad_y * D  # (Bt, L, Din), the skip term; the scan's share is added below
        grad_D = (grad_y * u).sum(dim=(0, 1))
        grad_delta, grad_B, grad_C = (torch.empty_like(t) for t in (delta, B, C))
        grad_A = torch.zeros_like(A_t)  # (N, Din)
        grad_h = grad_h_last  # dL/d(state at the end of the current chunk), from later chunks
        chunks = _chunks(u.shape[1], ctx.chunk_size)
        for k in reversed(range(len(chunks))):
            sl, h_in = chunks[k], starts[k]
            u_c, delta_c, B_c, gy = u[:, sl], delta[:, sl], B[:, sl], grad_y[:, sl, None, :]
            keep_c = ctx.keep[:, sl] if ctx.keep is not None else None
            dA, h = _chunk_states(u_c, delta_c, A_t, B_c, h_in, keep_c)  # recomputed
            # dL/dh_t = C_t gy_t + dA_{t+1} dL/dh_{t+1}: the same recurrence, backwards in
            # time, so it is solved by the forward scan on time-reversed inputs.
            g = C[:, sl, :, None] * gy  # (Bt, Lc, N, Din)
            g[:, -1] += grad_h
            g = _linear_scan(dA[:, 1:].flip(1), g.flip(1)).flip(1)  # dL/dh_t
            grad_C[:, sl] = (h * gy).sum(dim=3)  # sum over Din
            grad_B[:, sl] = (g * (delta_c * u_c)[:, :, None, :]).sum(dim=3)
            g_b = (g * B_c[..., None]).sum(dim=2)  # dL/d(delta_t u_t), (Bt, Lc, Din)
            # dL/d(delta_t A) = dL/dh_t * dA_t * h_{t-1}, with h_{-1} = h_in
            g_dA = g * dA  # (Bt, Lc, N, Din)
            g_log = torch.empty_like(g_dA)
            g_log[:, 0] = g_dA[:, 0] * h_in
            _store(g_log[:, 1:], torch.mul, g_dA[:, 1:], h[:, :-1])
            grad_delta[:, sl] = g_b * u_c + (g_log * A_t).sum(dim=2)
            grad_u[:, sl] += g_b * delta_c
            grad_A += (g_log * delta_c[:, :, None, :]).sum(dim=(0, 1))
            grad_h = g_dA[:, 0]  # dL/dh_in, handed to the previous chunk
        return grad_u, grad_delta, grad_A, grad_B, grad_C, grad_D, grad_h, None, None
