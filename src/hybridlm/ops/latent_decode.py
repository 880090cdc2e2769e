"""Decode attention over ONE shared key/value head whose value is the first Dv numbers of the
key (MLA's absorbed latent cache), split over the keys: a Triton kernel for CUDA.

Decoding is bound by reading the cache. With the heads folded into the query axis, each
program takes all Q queries of one row against one slice of the S keys, loads each key tile
once and uses its first Dv columns as the value tile, so the cache crosses memory once per
step. The slices (split-K, "flash decoding") fill the GPU at any batch size; each writes a
partial output and its log-sum-exp, which `single_head_decode` merges. The twin is SDPA over
the same folded queries (`ops.attention`'s single-head path).

Glossary: B batch, Q queries of the one head (heads x new tokens), S keys, Dk key width,
Dv value width (the key's first Dv numbers), Dr = Dk - Dv, P splits of the keys.

Measured on an H100 (bench/mla_decode.py, B 8, S 32,768, Dk 576, Dv 512, 32 queries): 64-key
tiles, 8 warps, about 2 programs per multiprocessor were the fastest of the tile and grid
sizes tried.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

BLOCK_KEYS = 64  # keys per tile
NUM_WARPS = 8
NUM_STAGES = 3  # key tiles in flight (software pipelining)
PROGRAMS_PER_SM = 2  # the grid's size: programs over all rows and splits, per multiprocessor


@triton.jit
def _partial_decode_kernel(
    q_ptr, kv_ptr, out_ptr, lse_ptr,
    num_queries, num_keys, keys_per_split, scale_log2,
    stride_qb, stride_qq, stride_kb, stride_ks, stride_ob, stride_oq, stride_op,
    stride_lb, stride_lq,
    BLOCK_Q: tl.constexpr, BLOCK_S: tl.constexpr, DV: tl.constexpr, DR: tl.constexpr,
):
    """Program (b, p): queries (Q, Dk) of row b against keys [p * keys_per_split, ...) ->
    unnormalised-then-normalised partial output (Q, Dv) and its log2-sum-exp (Q,)."""
    row, split = tl.program_id(0), tl.program_id(1)
    queries = tl.arange(0, BLOCK_Q)
    cols_v, cols_r = tl.arange(0, DV), tl.arange(0, DR)
    q_rows = q_ptr + row * stride_qb + queries[:, None] * stride_qq
    q_ok = queries[:, None] < num_queries
    q_lat = tl.load(q_rows + cols_v[None, :], mask=q_ok, other=0.0)  # (BLOCK_Q, DV)
    q_rope = tl.load(q_rows + DV + cols_r[None, :], mask=q_ok, other=0.0)  # (BLOCK_Q, DR)
    best = tl.full([BLOCK_Q], float("-inf"), tl.float32)
    total = tl.zeros([BLOCK_Q], tl.float32)
    acc = tl.zeros([BLOCK_Q, DV], tl.float32)
    first = split * keys_per_split
    last = tl.minimum(first + keys_per_split, num_keys)
    for start in range(first, last, BLOCK_S):
        keys = start + tl.arange(0, BLOCK_S)
        key_ok = keys < last
        k_rows = kv_ptr + row * stride_kb + keys[:, None] * stride_ks
        latent = tl.load(k_rows + cols_v[None, :], mask=key_ok[:, None], other=0.0)  # (S, DV)
        k_rope = tl.load(k_rows + DV + cols_r[None, :], mask=key_ok[:, None], other=0.0)
        scores = tl.dot(q_lat, tl.trans(latent)) + tl.dot(q_rope, tl.trans(k_rope))
        scores = tl.where(key_ok[None, :], scores * scale_log2, float("-inf"))  # (Q, S)
        new_best = tl.maximum(best, tl.max(scores, axis=1))
        probs = tl.exp2(scores - new_best[:, None])
        rescale = tl.exp2(best - new_best)
        total = total * rescale + tl.sum(probs, axis=1)
        # the key tile's first DV columns are the value tile: no second read of the cache
        acc = acc * rescale[:, None] + tl.dot(probs.to(latent.dtype), latent)
        best = new_best
    out_rows = out_ptr + row * stride_ob + queries[:, None] * stride_oq + split * stride_op
    tl.store(out_rows + cols_v[None, :], acc / total[:, None], mask=q_ok)
    lse_at = lse_ptr + row * stride_lb + queries * stride_lq + split
    tl.store(lse_at, best + tl.log2(total), mask=queries < num_queries)


def single_head_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       scale: float | None = None, *, block_keys: int = BLOCK_KEYS,
                       num_warps: int = NUM_WARPS, num_stages: int = NUM_STAGES,
                       programs_per_sm: int = PROGRAMS_PER_SM) -> torch.Tensor:
    """Softmax attention of q (B, Q, Dk) over every key of k (B, S, Dk), values
    v = k[..., :Dv] (B, S, Dv, a view of k) -> (B, Q, Dv) in q's dtype. No mask: each query
    sees all S keys (a decode step). scale: None = 1 / sqrt(Dk). The keyword arguments are
    the kernel's tile and grid sizes (the defaults are the fastest measured; see
    bench/mla_decode.py)."""
    batch, num_queries, dk = q.shape
    num_keys, dv = k.shape[1], v.shape[-1]
    if q.stride(-1) != 1 or k.stride(-1) != 1:
        raise ValueError("single_head_decode needs the last dimension of q and k contiguous")
    scale = 1.0 / math.sqrt(dk) if scale is None else scale
    sms = torch.cuda.get_device_properties(q.device).multi_processor_count
    # programs_per_sm programs per multiprocessor in all, each over whole key tiles.
    splits = max(1, min(triton.cdiv(programs_per_sm * sms, batch),
                        triton.cdiv(num_keys, block_keys)))
    keys_per_split = triton.cdiv(triton.cdiv(num_keys, splits), block_keys) * block_keys
    splits = triton.cdiv(num_keys, keys_per_split)  # every split holds at least one key
    # (B, Q, P, Dv) and (B, Q, P): the merge below reduces over P without a transpose
    partial = torch.empty(batch, num_queries, splits, dv, device=q.device, dtype=torch.float32)
    lse = torch.empty(batch, num_queries, splits, device=q.device, dtype=torch.float32)
    block_q = max(16, triton.next_power_of_2(num_queries))  # tl.dot needs 16 rows or more
    _partial_decode_kernel[(batch, splits)](
        q, k, partial, lse, num_queries, num_keys, keys_per_split, scale * math.log2(math.e),
        q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        partial.stride(0), partial.stride(1), partial.stride(2), lse.stride(0), lse.stride(1),
        BLOCK_Q=block_q, BLOCK_S=block_keys, DV=dv, DR=dk - dv, num_warps=num_warps,
        num_stages=num_stages,
    )
    # Merge the splits: weight each partial output by its share of the total softmax mass.
    weights = torch.softmax(lse * math.log(2.0), dim=-1)  # (B, Q, P)
    merged = torch.matmul(weights.unsqueeze(-2), partial)  # (B, Q, 1, Dv)
    return merged.squeeze(-2).to(q.dtype)  # (B, Q, Dv)
