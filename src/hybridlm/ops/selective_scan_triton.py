"""Selective scan of Mamba-1 as fused Triton kernels, forward and backward (needs triton).

Same function as `selective_scan_chunked` (see selective_scan.py for the recurrence and the
meaning of `reset`):

    h_t = exp(delta_t A) * h_{t-1} + delta_t B_t u_t,    y_t = C_t . h_t + D u_t

One program owns one batch row and a block of BD channels, and walks the sequence in time
tiles of T steps with its (BD, N) state in registers. Inside a tile the recurrence is solved
by `tl.associative_scan` over time on (T, BD, N) tiles, so no (Bt, L, Din, N) tensor ever
reaches device memory; everything is computed in fp32 whatever the input dtypes.

Forward writes y, the last state and the state entering every TS steps ("starts",
(Bt, KS, Din, N)). Backward walks tiles of TS steps in reverse, rebuilds each tile's states
from its start, and runs the adjoint recurrence

    g_t = C_t gy_t + exp(delta_{t+1} A) g_{t+1}      (g_t = dL/dh_t)

as a reverse scan in the same tile, carrying dL/d(state entering the tile) to the tile before.
Gradients summed over channels (B, C) leave each program as per-block partials, summed after.

Memory kept for backward: the inputs plus one fp32 (Din, N) state per TS steps, Din * N bytes
per token (24.6 KB at Din 1536, N 16, TS 4), against the reference's one state per chunk.

Both kernels are wrapped as `torch.library.custom_op`s with fake (meta) implementations and a
registered autograd formula, so `torch.compile(fullgraph=True)` traces through them.

Glossary: Bt batch, L sequence length, Din inner channels, N state size (NP: N rounded up to a
power of two), T time tile, TS backward tile (T a multiple of it), K = ceil(L / T) tiles,
KS = ceil(L / TS) saved states, BD channel block, P = ceil(Din / BD) channel blocks.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

KERNEL_DTYPES = (torch.float32, torch.bfloat16)  # the dtypes the parity tests cover
# Steps per tile. Each thread holds the tile's steps of one (channel, state) pair for a few
# (T, BD, NP) tiles. The forward walks tiles of FWD_TIME_TILE steps and saves the state
# entering every BWD_TIME_TILE steps; the backward, with more tiles alive, walks the shorter
# tiles: fewer registers per thread, more programs per multiprocessor to hide its latency.
FWD_TIME_TILE = 16
BWD_TIME_TILE = 4  # divides FWD_TIME_TILE
# BD * NP per program: one thread per (channel, state) pair in 4 warps, so small batches still
# spread over every multiprocessor (Bt * Din * N / 128 programs).
PAIRS_PER_PROGRAM = 128
# Register cap of the backward kernel (None: the compiler's choice); fewer registers let more
# programs share a multiprocessor, which hides the latency of its cross-warp reductions.
BWD_MAX_REGISTERS: int | None = None


def _bwd_options() -> dict[str, int]:
    return {"maxnreg": BWD_MAX_REGISTERS} if BWD_MAX_REGISTERS else {}


def _block_d(inner: int, state: int) -> int:
    """BD: channels per program."""
    per_program = max(1, PAIRS_PER_PROGRAM // triton.next_power_of_2(state))
    return min(per_program, triton.next_power_of_2(inner))


@triton.jit
def _linear_combine(a1, b1, a2, b2):
    """(a1, b1) earlier, (a2, b2) later: x -> a2 (a1 x + b1) + b2."""
    return a1 * a2, b1 * a2 + b2


@triton.jit
def _add_pair(a1, b1, a2, b2):
    return a1 + a2, b1 + b2


@triton.jit
def _load_rows(ptr, s_b, s_t, s_c, b, t, cols, mask):
    """Rows t (T,) of batch row b at columns cols (W,), as fp32, masked entries 0: (T, W)."""
    return tl.load(ptr + b * s_b + t[:, None] * s_t + cols[None, :] * s_c, mask=mask,
                   other=0.0).to(tl.float32)


@triton.jit
def _program_block(A_ptr, D_ptr, s_ad, s_an, DIN, N, BD: tl.constexpr, NP: tl.constexpr):
    """What both kernels start with: this program's batch row b and channel block, its masks,
    its offsets into a (Din, N) state, and A (BD, NP) and D (BD,) of its channels in fp32."""
    b = tl.program_id(1).to(tl.int64)
    offs_d = tl.program_id(0) * BD + tl.arange(0, BD)  # (BD,)
    offs_n = tl.arange(0, NP)
    mask_d = offs_d < DIN
    mask_n = offs_n < N
    mask_dn = mask_d[:, None] & mask_n[None, :]
    state_offs = offs_d[:, None] * N + offs_n[None, :]  # (BD, NP) into a (Din, N) state
    a_raw = tl.load(A_ptr + offs_d[:, None] * s_ad + offs_n[None, :] * s_an, mask=mask_dn,
                    other=0.0).to(tl.float32)
    d_skip = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    return b, offs_d, offs_n, mask_d, mask_n, mask_dn, state_offs, a_raw, d_skip


@triton.jit
def _scan_fwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, h0_ptr, reset_ptr,
    y_ptr, h_last_ptr, starts_ptr,
    L, DIN, N, K, KS,
    s_ub, s_ut, s_ud, s_db, s_dt, s_dd, s_ad, s_an, s_bb, s_bt, s_bn, s_cb, s_ct, s_cn,
    s_rb, s_rt,
    HAS_H0: tl.constexpr, HAS_RESET: tl.constexpr,
    T: tl.constexpr, TS: tl.constexpr, BD: tl.constexpr, NP: tl.constexpr,
):
    # K tiles of T steps; the state entering every TS steps goes to starts (Bt, KS, Din, N).
    SUB: tl.constexpr = T // TS
    b, offs_d, offs_n, mask_d, mask_n, mask_dn, state_offs, a_raw, d_skip = _program_block(
        A_ptr, D_ptr, s_ad, s_an, DIN, N, BD, NP)
    rows = tl.arange(0, T)
    a2 = a_raw * 1.4426950408889634  # A log2(e): exp2 below
    if HAS_H0:
        h = tl.load(h0_ptr + b * DIN * N + state_offs, mask=mask_dn, other=0.0)
    else:
        h = tl.zeros([BD, NP], dtype=tl.float32)
    for k in range(0, K):
        t = k * T + rows  # (T,)
        mask_t = t < L
        mask_td = mask_t[:, None] & mask_d[None, :]
        mask_tn = mask_t[:, None] & mask_n[None, :]
        # Rows past L load delta = 0: decay 1 and input 0, so the state rides through them.
        u = _load_rows(u_ptr, s_ub, s_ut, s_ud, b, t, offs_d, mask_td)  # (T, BD)
        dt = _load_rows(delta_ptr, s_db, s_dt, s_dd, b, t, offs_d, mask_td)  # (T, BD)
        bm = _load_rows(B_ptr, s_bb, s_bt, s_bn, b, t, offs_n, mask_tn)  # (T, NP)
        cm = _load_rows(C_ptr, s_cb, s_ct, s_cn, b, t, offs_n, mask_tn)  # (T, NP)
        tl.store(starts_ptr + (b * KS + k * SUB) * DIN * N + state_offs, h, mask=mask_dn)
        decay = tl.exp2(dt[:, :, None] * a2[None, :, :])  # (T, BD, NP)
        if HAS_RESET:
            cut = tl.load(reset_ptr + b * s_rb + t * s_rt, mask=mask_t, other=0) != 0
            decay = tl.where(cut[:, None, None], 0.0, decay)
        x = (dt * u)[:, :, None] * bm[:, None, :]  # (T, BD, NP)
        x = tl.where(rows[:, None, None] == 0, x + decay * h[None, :, :], x)  # carry in
        _, hs = tl.associative_scan((decay, x), 0, _linear_combine)  # states h_t
        for j in tl.static_range(1, SUB):  # states entering the later sub-tiles
            h_j = tl.sum(tl.where(rows[:, None, None] == j * TS - 1, hs, 0.0), axis=0)
            tl.store(starts_ptr + (b * KS + k * SUB + j) * DIN * N + state_offs, h_j,
                     mask=mask_dn & (k * SUB + j < KS))
        y = tl.sum(hs * cm[:, None, :], axis=2) + d_skip[None, :] * u  # (T, BD)
        tl.store(y_ptr + b * L * DIN + t[:, None] * DIN + offs_d[None, :], y, mask=mask_td)
        h = tl.sum(tl.where(rows[:, None, None] == T - 1, hs, 0.0), axis=0)  # last row
    tl.store(h_last_ptr + b * DIN * N + state_offs, h, mask=mask_dn)


@triton.jit
def _scan_bwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, reset_ptr, starts_ptr, gy_ptr, gh_ptr,
    gu_ptr, gdelta_ptr, gA_ptr, gB_ptr, gC_ptr, gD_ptr, gh0_ptr,
    L, DIN, N, K, BT,
    s_ub, s_ut, s_ud, s_db, s_dt, s_dd, s_ad, s_an, s_bb, s_bt, s_bn, s_cb, s_ct, s_cn,
    s_rb, s_rt, s_gb, s_gt, s_gd, s_vb, s_vt, s_vd,
    HAS_RESET: tl.constexpr,
    T: tl.constexpr, BD: tl.constexpr, NP: tl.constexpr,
):
    # K tiles of T steps (the forward's TS), walked last to first; starts holds one per tile.
    b, offs_d, offs_n, mask_d, mask_n, mask_dn, state_offs, a_raw, d_skip = _program_block(
        A_ptr, D_ptr, s_ad, s_an, DIN, N, BD, NP)
    rows = tl.arange(0, T)
    a2 = a_raw * 1.4426950408889634
    carry = tl.load(gh_ptr + b * DIN * N + state_offs, mask=mask_dn, other=0.0)  # dL/dh_end
    grad_a = tl.zeros([BD, NP], dtype=tl.float32)
    grad_d = tl.zeros([BD], dtype=tl.float32)
    # This block's slice of the (P, Bt, L, N) partials.
    partial = (tl.program_id(0) * BT + b) * L * N
    for kk in range(0, K):
        k = K - 1 - kk
        t = k * T + rows  # (T,)
        mask_t = t < L
        mask_next = t + 1 < L
        mask_td = mask_t[:, None] & mask_d[None, :]
        mask_tn = mask_t[:, None] & mask_n[None, :]
        u = _load_rows(u_ptr, s_ub, s_ut, s_ud, b, t, offs_d, mask_td)  # (T, BD)
        dt = _load_rows(delta_ptr, s_db, s_dt, s_dd, b, t, offs_d, mask_td)  # (T, BD)
        dt_next = _load_rows(delta_ptr, s_db, s_dt, s_dd, b, t + 1, offs_d,
                             mask_next[:, None] & mask_d[None, :])  # delta_{t+1}, (T, BD)
        gy = _load_rows(gy_ptr, s_gb, s_gt, s_gd, b, t, offs_d, mask_td)  # (T, BD)
        bm = _load_rows(B_ptr, s_bb, s_bt, s_bn, b, t, offs_n, mask_tn)  # (T, NP)
        cm = _load_rows(C_ptr, s_cb, s_ct, s_cn, b, t, offs_n, mask_tn)  # (T, NP)
        h_in = tl.load(starts_ptr + (b * K + k) * DIN * N + state_offs, mask=mask_dn, other=0.0)
        decay = tl.exp2(dt[:, :, None] * a2[None, :, :])  # (T, BD, NP)
        decay_next = tl.exp2(dt_next[:, :, None] * a2[None, :, :])
        if HAS_RESET:
            cut = tl.load(reset_ptr + b * s_rb + t * s_rt, mask=mask_t, other=0) != 0
            cut_next = tl.load(reset_ptr + b * s_rb + (t + 1) * s_rt, mask=mask_next,
                               other=0) != 0
            decay = tl.where(cut[:, None, None], 0.0, decay)
            decay_next = tl.where(cut_next[:, None, None], 0.0, decay_next)
        dtu = dt * u  # (T, BD)
        x = dtu[:, :, None] * bm[:, None, :]  # (T, BD, NP)
        first = rows[:, None, None] == 0
        _, hs = tl.associative_scan((decay, tl.where(first, x + decay * h_in[None], x)), 0,
                                    _linear_combine)  # states, rebuilt from the tile start
        g_in = cm[:, None, :] * gy[:, :, None]  # (T, BD, NP)
        g_in = tl.where(rows[:, None, None] == T - 1, g_in + carry[None], g_in)
        _, g = tl.associative_scan((decay_next, g_in), 0, _linear_combine, reverse=True)
        # Paired reductions: one cross-warp exchange for dC and dB, one shuffle tree for the
        # two sums over the state.
        part_c, part_b = tl.reduce((hs * gy[:, :, None], g * dtu[:, :, None]), 1, _add_pair)
        tl.store(gC_ptr + partial + t[:, None] * N + offs_n[None, :], part_c, mask=mask_tn)
        tl.store(gB_ptr + partial + t[:, None] * N + offs_n[None, :], part_b, mask=mask_tn)
        g_log = g * (hs - x)  # dL/d(delta_t A) = g_t decay_t h_{t-1}, (T, BD, NP)
        g_bu, g_a = tl.reduce((g * bm[:, None, :], g_log * a_raw[None]), 2, _add_pair)
        grad_delta = g_bu * u + g_a  # g_bu = dL/d(delta_t u_t), (T, BD)
        grad_u = g_bu * dt + gy * d_skip[None, :]
        tl.store(gdelta_ptr + b * L * DIN + t[:, None] * DIN + offs_d[None, :], grad_delta,
                 mask=mask_td)
        tl.store(gu_ptr + b * s_vb + t[:, None] * s_vt + offs_d[None, :] * s_vd, grad_u,
                 mask=mask_td)
        grad_a += tl.sum(g_log * dt[:, :, None], axis=0)
        grad_d += tl.sum(gy * u, axis=0)
        carry = tl.sum(tl.where(first, g * decay, 0.0), axis=0)  # dL/d(state entering)
    tl.store(gA_ptr + b * DIN * N + state_offs, grad_a, mask=mask_dn)
    tl.store(gD_ptr + b * DIN + offs_d, grad_d, mask=mask_d)
    tl.store(gh0_ptr + b * DIN * N + state_offs, carry, mask=mask_dn)


def _strides3(t: Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def _launch_args(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                 reset: Tensor | None) -> tuple[int, ...]:
    """Strides shared by both kernels, in kernel order: u, delta, A, B, C, reset."""
    reset_strides = reset.stride() if reset is not None else (0, 0)
    return (*_strides3(u), *_strides3(delta), *A.stride(), *_strides3(B), *_strides3(C),
            *reset_strides)


def _blocks(u: Tensor, A: Tensor) -> tuple[int, int, int, int]:
    """BD, P channel blocks, NP and warps for u (Bt, L, Din) and A (Din, N)."""
    inner, state = u.shape[2], A.shape[1]
    block_d, np2 = _block_d(inner, state), triton.next_power_of_2(state)
    return block_d, triton.cdiv(inner, block_d), np2, max(1, min(8, block_d * np2 // 32))


@torch.library.custom_op("hybridlm::selective_scan_fwd", mutates_args=())
def _scan_fwd(
    u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor, h0: Tensor | None,
    reset: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """y (Bt, L, Din) in u's dtype, h_last (Bt, Din, N) fp32, starts (Bt, KS, Din, N) fp32."""
    batch, length, inner = u.shape
    state = A.shape[1]
    block_d, blocks, np2, warps = _blocks(u, A)
    saved = -(-length // BWD_TIME_TILE)
    y = torch.empty(batch, length, inner, device=u.device, dtype=u.dtype)
    h_last = torch.empty(batch, inner, state, device=u.device, dtype=torch.float32)
    starts = torch.empty(batch, saved, inner, state, device=u.device, dtype=torch.float32)
    h0_arg = h0.float().contiguous() if h0 is not None else h_last  # unread without HAS_H0
    reset_arg = reset if reset is not None else u  # unread without HAS_RESET
    _scan_fwd_kernel[(blocks, batch)](
        u, delta, A, B, C, D, h0_arg, reset_arg, y, h_last, starts,
        length, inner, state, -(-length // FWD_TIME_TILE), saved,
        *_launch_args(u, delta, A, B, C, reset),
        HAS_H0=h0 is not None, HAS_RESET=reset is not None,
        T=FWD_TIME_TILE, TS=BWD_TIME_TILE, BD=block_d, NP=np2, num_warps=warps,
    )
    return y, h_last, starts


@_scan_fwd.register_fake
def _(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor,
      h0: Tensor | None, reset: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    batch, length, inner = u.shape
    tiles = -(-length // BWD_TIME_TILE)
    return (u.new_empty(batch, length, inner),
            u.new_empty(batch, inner, A.shape[1], dtype=torch.float32),
            u.new_empty(batch, tiles, inner, A.shape[1], dtype=torch.float32))


@torch.library.custom_op("hybridlm::selective_scan_bwd", mutates_args=())
def _scan_bwd(
    grad_y: Tensor, grad_h_last: Tensor, u: Tensor, delta: Tensor, A: Tensor, B: Tensor,
    C: Tensor, D: Tensor, reset: Tensor | None, starts: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of (u, delta, A, B, C, D, h0), each in its input's dtype (h0's in fp32)."""
    batch, length, inner = u.shape
    state = A.shape[1]
    block_d, blocks, np2, warps = _blocks(u, A)
    f32 = dict(device=u.device, dtype=torch.float32)
    grad_u = torch.empty_like(u)  # u's strides: the layer's u is a view of (Bt, Din, L)
    grad_delta = torch.empty(batch, length, inner, device=u.device, dtype=delta.dtype)
    grad_a = torch.empty(batch, inner, state, **f32)  # per row; summed below
    grad_b = torch.empty(blocks, batch, length, state, **f32)  # per channel block
    grad_c = torch.empty(blocks, batch, length, state, **f32)
    grad_d = torch.empty(batch, inner, **f32)
    grad_h0 = torch.empty(batch, inner, state, **f32)
    reset_arg = reset if reset is not None else u
    _scan_bwd_kernel[(blocks, batch)](
        u, delta, A, B, C, D, reset_arg, starts, grad_y, grad_h_last.float().contiguous(),
        grad_u, grad_delta, grad_a, grad_b, grad_c, grad_d, grad_h0,
        length, inner, state, starts.shape[1], batch, *_launch_args(u, delta, A, B, C, reset),
        *_strides3(grad_y), *_strides3(grad_u), HAS_RESET=reset is not None,
        T=BWD_TIME_TILE, BD=block_d, NP=np2, num_warps=warps, **_bwd_options(),
    )
    return (grad_u, grad_delta, grad_a.sum(0).to(A.dtype), grad_b.sum(0).to(B.dtype),
            grad_c.sum(0).to(C.dtype), grad_d.sum(0).to(D.dtype), grad_h0)


@_scan_bwd.register_fake
def _(grad_y: Tensor, grad_h_last: Tensor, u: Tensor, delta: Tensor, A: Tensor, B: Tensor,
      C: Tensor, D: Tensor, reset: Tensor | None, starts: Tensor
      ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    batch, _, inner = u.shape
    return (torch.empty_like(u), torch.empty_like(delta), torch.empty_like(A),
            torch.empty_like(B), torch.empty_like(C), torch.empty_like(D),
            u.new_empty(batch, inner, A.shape[1], dtype=torch.float32))


def _setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
    u, delta, A, B, C, D, h0, reset = inputs
    ctx.save_for_backward(u, delta, A, B, C, D, reset, output[2])
    ctx.has_h0 = h0 is not None


def _backward(ctx: Any, grad_y: Tensor | None, grad_h_last: Tensor | None,
              grad_starts: Tensor | None) -> tuple[Tensor | None, ...]:
    del grad_starts  # starts is saved for backward only, never differentiated
    u, delta, A, B, C, D, reset, starts = ctx.saved_tensors
    batch, _, inner = u.shape
    if grad_y is None:
        grad_y = torch.zeros_like(u)
    if grad_h_last is None:
        grad_h_last = u.new_zeros(batch, inner, A.shape[1], dtype=torch.float32)
    grads = _scan_bwd(grad_y, grad_h_last, u, delta, A, B, C, D, reset, starts)
    grad_h0 = grads[6] if ctx.has_h0 else None
    return (*grads[:6], grad_h0, None)


_scan_fwd.register_autograd(_backward, setup_context=_setup_context)


def selective_scan_fast(
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
    """The fused kernels behind the signature of `selective_scan_chunked`.

    u, delta: (Bt, L, Din) (fp32 or bf16, any strides); A: (Din, N); B, C: (Bt, L, N);
    D: (Din,); h0: (Bt, Din, N) or None; reset: (Bt, L) bool or None. Returns y (Bt, L, Din) in
    u's dtype and h_last (Bt, Din, N) fp32. chunk_size is only checked: it sizes the
    reference's working set, while the kernels keep their own time tile in registers.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be >= 1")
    if u.shape[1] < 1:
        raise ValueError("selective_scan_fast needs at least one time step (L >= 1)")
    for name, t in (("u", u), ("delta", delta), ("B", B), ("C", C)):
        if t.dtype not in KERNEL_DTYPES:
            raise ValueError(f"{name}.dtype={t.dtype} is not supported; allowed: {KERNEL_DTYPES}")
    reset = reset.bool() if reset is not None else None
    y, h_last, _ = _scan_fwd(u, delta, A, B, C, D.contiguous(), h0, reset)
    return y, h_last
