import math

import torch

from hybridlm.config import ModelConfig
from hybridlm.layers.attention import Attention


def make_attention(kv_heads: int, *, qk_norm: bool, mu: bool) -> Attention:
    """A 32-wide, 4-head GQA mixer with kv_heads key/value heads."""
    config = ModelConfig(
        vocab_size=97, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=kv_heads, intermediate_size=64, attn_qk_norm=qk_norm,
        mu_guidance=mu,
    )
    return Attention(config, 0)


def manual_mha(q, k, v):
    """Plain causal multi-head attention: softmax(q k^T / sqrt(d) + causal) v, per head."""
    t = q.shape[2]
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    mask = torch.ones(t, t, dtype=torch.bool).tril()
    return scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v


def _project(attn, x, positions):
    """q, k, v exactly as the layer forms them, before attention."""
    from hybridlm.layers.rope import apply_rope

    b, t, _ = x.shape
    nh, nkv, d = attn.num_heads, attn.num_kv_heads, attn.head_dim
    q, k, v = attn.qkv_proj(x).split([nh * d, nkv * d, nkv * d], -1)
    q = attn.q_norm(q.view(b, t, nh, d).transpose(1, 2))
    k = attn.k_norm(k.view(b, t, nkv, d).transpose(1, 2))
    v = v.view(b, t, nkv, d).transpose(1, 2)
    cos, sin = attn.rope.cos_sin(positions)
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


def test_gqa_with_all_kv_heads_equals_plain_mha():
    torch.manual_seed(0)
    attn = make_attention(4, qk_norm=True, mu=False)
    x = torch.randn(2, 7, 32)
    pos = torch.arange(7)
    q, k, v = _project(attn, x, pos)
    expected = attn.o_proj(manual_mha(q, k, v).transpose(1, 2).reshape(2, 7, 32))
    torch.testing.assert_close(attn(x, positions=pos), expected, atol=1e-5, rtol=1e-5)


def test_gqa_shares_each_kv_head_across_its_query_group():
    torch.manual_seed(0)
    attn = make_attention(2, qk_norm=True, mu=False)
    x = torch.randn(1, 5, 32)
    pos = torch.arange(5)
    q, k, v = _project(attn, x, pos)
    k4, v4 = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
    expected = attn.o_proj(manual_mha(q, k4, v4).transpose(1, 2).reshape(1, 5, 32))
    torch.testing.assert_close(attn(x, positions=pos), expected, atol=1e-5, rtol=1e-5)


PARITY_TOL = 1e-5  # atol = rtol of cached vs full outputs (measured error ~1e-7)


def decode_in_chunks(attn, x, mu, chunks):
    """Outputs (B, sum(chunks), H) of x fed through one KV cache, chunk after chunk."""
    cache = attn.new_cache(x.shape[0], 16, x.device, x.dtype)
    outs, start = [], 0
    for n in chunks:
        sl = slice(start, start + n)
        outs.append(attn(x[:, sl], positions=torch.arange(start, start + n), cache=cache,
                         mu_prev=mu[:, sl]))
        start += n
    return torch.cat(outs, 1)


def test_cached_decode_matches_full_forward_token_by_token_and_in_chunks():
    torch.manual_seed(0)
    attn = make_attention(2, qk_norm=True, mu=True)
    x, mu = torch.randn(2, 9, 32), torch.randn(2, 9, 32)
    full = attn(x, positions=torch.arange(9), mu_prev=mu)
    for chunks in ([1] * 9, [4, 1, 3, 1]):
        out = decode_in_chunks(attn, x, mu, chunks)
        torch.testing.assert_close(out, full, atol=PARITY_TOL, rtol=PARITY_TOL)


def test_a_cache_that_forgets_the_history_fails_the_parity(break_cache):
    torch.manual_seed(0)
    attn = make_attention(2, qk_norm=True, mu=True)
    x, mu = torch.randn(2, 9, 32), torch.randn(2, 9, 32)
    with torch.no_grad():
        full = attn(x, positions=torch.arange(9), mu_prev=mu)
        break_cache("kv_cache_forgets")
        for chunks in ([1] * 9, [4, 1, 3, 1]):
            error = (decode_in_chunks(attn, x, mu, chunks) - full).abs().amax()
            assert error > 1000 * PARITY_TOL * max(1.0, float(full.abs().amax())), chunks


def test_mu_is_one_fused_projection_of_x_and_mu():
    torch.manual_seed(0)
    attn = make_attention(2, qk_norm=False, mu=True)
    plain = make_attention(2, qk_norm=False, mu=False)
    x, mu = torch.randn(1, 4, 32), torch.randn(1, 4, 32)
    w = attn.qkv_proj.weight
    qkv = attn.qkv_proj(torch.cat([x, mu], -1))
    torch.testing.assert_close(qkv, x @ w[:, :32].T + mu @ w[:, 32:].T, atol=1e-5, rtol=1e-5)
    # with mu_prev = 0 the mu columns contribute nothing: a plain layer with the x columns
    with torch.no_grad():
        plain.qkv_proj.weight.copy_(w[:, :32])
        plain.o_proj.weight.copy_(attn.o_proj.weight)
    pos = torch.arange(4)
    torch.testing.assert_close(attn(x, positions=pos, mu_prev=torch.zeros_like(mu)),
                               plain(x, positions=pos), atol=1e-6, rtol=1e-6)
