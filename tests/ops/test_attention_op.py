"""ops.attention, the one attention kernel: causal masking aligned with a cache (the new
queries are the last of the keys), GQA head sharing, value width apart from key width, and a
packed-row mask replacing the causal rule.

Glossary: B batch, nh query heads, nkv key/value heads, T queries, S keys, D width.
"""

import math

import pytest
import torch

from hybridlm.ops import attention


def explicit(q, k, v, allowed):
    """softmax(q k^T / sqrt(D) masked by allowed (T, S)) v, one head per kv head."""
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    return scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v


@pytest.mark.parametrize("num_queries", [1, 3, 7])
def test_new_queries_see_the_cached_keys_and_themselves(num_queries):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 7, 8) for _ in range(3))
    new = q[:, :, 7 - num_queries:]  # the last T queries, after 7 - T cached tokens
    full_causal = torch.ones(7, 7, dtype=torch.bool).tril()[7 - num_queries:]  # (T, S)
    torch.testing.assert_close(attention(new, k, v), explicit(new, k, v, full_causal))


def test_each_kv_head_serves_its_query_group():
    torch.manual_seed(0)
    q = torch.randn(1, 4, 5, 8)
    k, v = torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 6)  # 2 kv heads, value width 6
    causal = torch.ones(5, 5, dtype=torch.bool).tril()
    expected = explicit(q, k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1), causal)
    torch.testing.assert_close(attention(q, k, v), expected)


def test_a_mask_replaces_the_causal_rule():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 4, 8) for _ in range(3))
    mask = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]], dtype=torch.bool)
    torch.testing.assert_close(attention(q, k, v, attn_mask=mask[None, None]),
                               explicit(q, k, v, mask))
    scaled = attention(q, k, v, scale=0.5)  # scale replaces 1/sqrt(D)
    torch.testing.assert_close(scaled, attention(q * 0.5 * math.sqrt(8), k, v))
