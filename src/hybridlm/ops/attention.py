"""The one attention kernel entry point: every attention-like mixer (GQA, MLA plain and
absorbed) calls `attention`, never SDPA itself, so masking lives here once and a new backend
(flex, FlashAttention, paged) is one change in this file.

Glossary: B batch, nh query heads, nkv key/value heads, T queries (the new tokens),
S keys (cached + new tokens), Dk query/key width, Dv value width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


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
    (B or 1, 1, T, S) bool, True = attend, replaces that causal rule (packed rows)."""
    num_queries, num_keys = q.shape[2], k.shape[2]
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
