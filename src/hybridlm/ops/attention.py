"""The one attention kernel entry point: every attention-like mixer (GQA, MLA plain and
absorbed) calls `attention`, never SDPA itself, so masking lives here once and a new backend
(flex, FlashAttention, paged) is one change in this file.

Glossary: B batch, nh query heads, nkv key/value heads, T queries (the new tokens),
S keys (cached + new tokens), Dk query/key width, Dv value width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hybridlm.ops.dispatch import fast_path_enabled, triton_available

# Queries per head up to which one shared key/value head is attended with the heads folded
# into the query axis (decode steps, short speculative blocks). The fold repeats the (T, S)
# mask per head, which stays small next to the cache only while T is small.
MAX_FOLDED_QUERIES = 16


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    attn_mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Causal softmax attention: q (B, nh, T, Dk), k (B, nkv, S, Dk), v (B, nkv, S, Dv) ->
    (B, nh, T, Dv). nkv must divide nh (GQA: each key/value head serves nh / nkv query heads);
    Dv may differ from Dk (MLA). scale: None = 1 / sqrt(Dk).

    The T queries are the LAST T of the S positions (a cache holds the S - T before them), so
    query i sits at key position S - T + i and sees keys 0 .. S - T + i. attn_mask
    (B or 1, 1, T, S) bool, True = attend, replaces that causal rule (packed rows).

    One key/value head (MQA, MLA's absorbed latent) with few queries (decoding) is attended
    with the heads as extra queries, so the keys and values are read once for all heads;
    v may then be a view of k (MLA: the value is the first Dv numbers of the key)."""
    num_queries, num_keys = q.shape[2], k.shape[2]
    if k.shape[1] == 1 < q.shape[1] and num_queries <= MAX_FOLDED_QUERIES:
        return _single_kv_head(q, k, v, attn_mask, scale)
    mask_args = (
        {"attn_mask": attn_mask} if attn_mask is not None
        else causal_mask_args(num_queries, num_keys, q.device)
    )
    return F.scaled_dot_product_attention(
        q, k, v, **mask_args, scale=scale, enable_gqa=k.shape[1] != q.shape[1]
    )


def causal_mask_args(num_queries: int, num_keys: int, device: torch.device) -> dict:
    """SDPA mask arguments for causal masking aligned at the BOTTOM-right: query i sits at key
    position S - T + i.

    SDPA's `is_causal=True` aligns the mask top-left, which is only right when T == S; with a
    cache it would let a decoded token see key 0 alone. So is_causal is used for T == S only,
    no mask for a single decoded token, and an explicit mask otherwise.
    """
    if num_queries == num_keys:
        return {"is_causal": True}
    if num_queries == 1:
        return {}
    offset = num_keys - num_queries
    query_pos = torch.arange(num_queries, device=device)[:, None] + offset
    key_pos = torch.arange(num_keys, device=device)[None, :]
    return {"attn_mask": key_pos <= query_pos}  # (T, S) bool, True = attend


def _single_kv_head(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None,
    scale: float | None,
) -> torch.Tensor:
    """q (B, nh, T, Dk) against ONE key/value head k (B, 1, S, Dk), v (B, 1, S, Dv): the nh
    heads become nh * T queries of that head (row h * T + t), so no kernel repeats or
    expands the cache per head. Returns (B, nh, T, Dv)."""
    batch, heads, num_queries, _ = q.shape
    num_keys = k.shape[2]
    mask = attn_mask if attn_mask is not None else causal_mask_args(
        num_queries, num_keys, q.device).get("attn_mask")  # (T, S), or None: all visible
    if mask is None and num_queries < num_keys and _decode_kernel_applies(q, k, v):
        from hybridlm.ops.latent_decode import single_head_decode  # triton: GPU builds only

        folded = single_head_decode(q.reshape(batch, heads * num_queries, -1), k[:, 0], v[:, 0],
                                    scale)  # (B, nh*T, Dv)
        return folded.view(batch, heads, num_queries, -1)
    if num_queries == num_keys and attn_mask is None:
        mask = torch.ones(num_queries, num_keys, dtype=torch.bool, device=q.device).tril()
    if mask is not None:  # row h * T + t of the folded queries takes row t of the mask
        mask = mask.repeat(heads, 1) if mask.dim() == 2 else mask.repeat(1, 1, heads, 1)
    folded = F.scaled_dot_product_attention(
        q.reshape(batch, 1, heads * num_queries, -1), k, v, attn_mask=mask, scale=scale
    )  # (B, 1, nh*T, Dv)
    return folded.view(batch, heads, num_queries, -1)


def _decode_kernel_applies(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """The Triton decode kernel covers MLA's absorbed decode on a GPU: half-precision inputs,
    v the first Dv numbers of k (one read of the cache serves both), and power-of-two Dv and
    Dk - Dv (its tile widths)."""
    dv, extra = v.shape[-1], k.shape[-1] - v.shape[-1]
    return (
        fast_path_enabled(q) and triton_available()
        and q.dtype in (torch.float16, torch.bfloat16) and k.dtype == v.dtype == q.dtype
        and v.data_ptr() == k.data_ptr() and v.stride() == k.stride()
        and extra >= 16 and dv >= 16 and (dv & (dv - 1)) == 0 and (extra & (extra - 1)) == 0
    )
