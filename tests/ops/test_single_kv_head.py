"""`ops.attention` with one key/value head (MQA, MLA's absorbed latent): the heads folded into
the query axis give what every head attending its own copy of the keys gives."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hybridlm import ops


def per_head_copies(q, k, v, mask):
    """The twin: the single head repeated for every query head (what folding avoids)."""
    heads = q.shape[1]
    return F.scaled_dot_product_attention(q, k.repeat(1, heads, 1, 1), v.repeat(1, heads, 1, 1),
                                          attn_mask=mask)


def causal(num_queries: int, num_keys: int) -> torch.Tensor:
    offset = num_keys - num_queries
    return torch.arange(num_keys)[None, :] <= torch.arange(num_queries)[:, None] + offset


@pytest.mark.parametrize("num_queries, num_keys", [(1, 9), (3, 9), (5, 5), (16, 20)])
@pytest.mark.parametrize("packed", [False, True])
def test_folded_heads_equal_per_head_copies(num_queries, num_keys, packed):
    torch.manual_seed(num_queries * 31 + num_keys)
    q = torch.randn(2, 4, num_queries, 24)
    kv = torch.randn(2, 1, num_keys, 24)
    k, v = kv, kv[..., :16]  # the value a view of the key's first numbers, as in MLA
    mask = causal(num_queries, num_keys)
    if packed:  # a per-row mask (B, 1, T, S): row 1 cannot see its first two keys
        mask = mask.expand(2, 1, -1, -1).clone()
        mask[1, :, :, :2] = False
    got = ops.attention(q, k, v, attn_mask=mask if packed else None)
    assert got.shape == (2, 4, num_queries, 16)
    torch.testing.assert_close(got, per_head_copies(q, k, v, mask), atol=1e-5, rtol=1e-5)
