import dataclasses
import math

import pytest
import torch

from hybridlm.config import ModelConfig
from hybridlm.layers.mla import MLACache, MultiHeadLatentAttention

NH, D, R, DR = 4, 8, 8, 4  # heads, per-head dim (32 / 4), kv rank, rope dim
PARITY_TOL = 1e-5  # atol = rtol of cached vs full outputs (measured error ~2e-7)


def make_mla(seed: int = 0, **overrides) -> MultiHeadLatentAttention:
    base = dict(
        vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=NH,
        num_key_value_heads=NH, intermediate_size=64, mixer_pattern="L", mla_kv_rank=R,
        mla_rope_dim=DR, max_position_embeddings=64,
    )
    torch.manual_seed(seed)
    return MultiHeadLatentAttention(ModelConfig(**{**base, **overrides}), 0).eval()


def reference(mla, q_nope, q_rope, c_kv, k_rope):
    """Explicit per-head scores (q_nope.k_nope + q_rope.k_rope)/sqrt(d+dr), bottom-right causal."""
    b, s, _ = c_kv.shape
    t = q_nope.shape[2]
    k_nope = mla.k_up(c_kv).view(b, s, NH, D).transpose(1, 2)  # (B, nh, S, d)
    v = mla.v_up(c_kv).view(b, s, NH, D).transpose(1, 2)
    scores = q_nope @ k_nope.mT + q_rope @ k_rope[:, None].mT  # one rope key for every head
    scores = scores / math.sqrt(D + DR)
    allowed = torch.arange(s)[None, :] <= torch.arange(t)[:, None] + (s - t)
    return scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v  # (B, nh, T, d)


def run_chunks(mla, x, chunks, max_len=16):
    cache = mla.new_cache(x.shape[0], max_len, x.device, x.dtype)
    outs, start = [], 0
    for n in chunks:
        outs.append(mla(x[:, start:start + n], positions=torch.arange(start, start + n),
                        cache=cache))
        start += n
    return torch.cat(outs, 1), cache


@pytest.mark.parametrize("absorb", [False, True])
@pytest.mark.parametrize("q_rank", [None, 6])
def test_cached_decode_matches_full_forward_token_by_token_and_in_chunks(q_rank, absorb):
    mla = make_mla(mla_q_rank=q_rank, mla_absorb=absorb)
    x = torch.randn(2, 9, 32)
    with torch.no_grad():
        full = mla(x, positions=torch.arange(9))
        for chunks in ([1] * 9, [4, 1, 3, 1]):
            out, cache = run_chunks(mla, x, chunks)
            assert cache.length == sum(chunks)
            torch.testing.assert_close(out, full[:, : sum(chunks)], atol=PARITY_TOL,
                                       rtol=PARITY_TOL)


@pytest.mark.parametrize("absorb", [False, True], ids=["plain", "absorbed"])
def test_a_cache_that_forgets_the_history_fails_the_parity(break_cache, absorb):
    mla = make_mla(mla_absorb=absorb)
    x = torch.randn(2, 9, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = mla(x, positions=torch.arange(9))
        break_cache("mla_cache_forgets")
        for chunks in ([1] * 9, [4, 1, 3, 1]):
            error = (run_chunks(mla, x, chunks)[0] - full).abs().amax()
            assert error > 1000 * PARITY_TOL * max(1.0, float(full.abs().amax())), chunks


@pytest.mark.parametrize(("offset", "t"), [(0, 1), (0, 6), (5, 1), (3, 4), (7, 3)])
def test_absorbed_attention_equals_plain_and_explicit_scores(offset, t):
    mla = make_mla(mla_q_rank=6)
    x = torch.randn(2, offset + t, 32)
    with torch.no_grad():
        q_nope, q_rope, c_kv, k_rope = mla._project(x, torch.arange(offset + t))
        # queries are the last t tokens; keys are everything cached so far (S = offset + t)
        q_nope, q_rope = q_nope[:, :, offset:], q_rope[:, :, offset:]
        plain = mla._attend(q_nope, q_rope, c_kv, k_rope)
        absorbed = mla._attend_absorbed(q_nope, q_rope, torch.cat([c_kv, k_rope], dim=-1))
        expected = reference(mla, q_nope, q_rope, c_kv, k_rope)
    assert absorbed.shape == (2, NH, t, D)
    torch.testing.assert_close(absorbed, plain, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(plain, expected, atol=1e-5, rtol=1e-5)


def test_absorbed_decode_never_builds_keys_or_values():
    mla = make_mla(mla_absorb=True)

    def forbid(*_):
        raise AssertionError("absorbed path must not up-project the latent to K/V")

    mla.k_up.register_forward_hook(forbid)
    mla.v_up.register_forward_hook(forbid)
    with torch.no_grad():
        run_chunks(mla, torch.randn(1, 5, 32), [3, 1, 1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cache_holds_only_latent_and_rope_key(dtype):
    mla = make_mla(mla_absorb=True).to(dtype)
    cache = mla.new_cache(3, 10, torch.device("cpu"), dtype)
    assert cache.nbytes() == 3 * 10 * (R + DR) * torch.empty(0, dtype=dtype).element_size()
    bookkeeping = {"lengths", "input_lengths", "key_window"}  # per row or per call: not per token
    assert {f.name for f in dataclasses.fields(MLACache)} == {"kv", "kv_rank"} | bookkeeping
    tensors = {k: v.shape for k, v in vars(cache).items()
               if isinstance(v, torch.Tensor) and k not in bookkeeping}
    assert tensors == {"kv": (3, 10, R + DR)}  # [latent | rope key] per token, nothing else
    assert cache.c_kv.shape == (3, 10, R) and cache.k_rope.shape == (3, 10, DR)
    assert cache.c_kv.data_ptr() == cache.kv.data_ptr()  # views, not copies
    assert cache.lengths.shape == (3,)
    with torch.no_grad():
        out = mla(torch.randn(3, 4, 32, dtype=dtype), positions=torch.arange(4), cache=cache)
    assert out.dtype == dtype and cache.length == 4


@pytest.mark.parametrize("absorb", [False, True])
def test_future_tokens_do_not_change_earlier_outputs(absorb):
    mla = make_mla(mla_absorb=absorb)
    x = torch.randn(1, 8, 32)
    y = x.clone()
    y[:, 5:] = torch.randn(1, 3, 32)
    with torch.no_grad():
        for run in (lambda z: mla(z, positions=torch.arange(8)),
                    lambda z: run_chunks(mla, z, [4, 1, 3])[0]):
            a, b = run(x), run(y)
            torch.testing.assert_close(a[:, :5], b[:, :5], atol=1e-6, rtol=1e-6)
            assert not torch.allclose(a[:, 5:], b[:, 5:])


def test_rope_key_is_shared_by_heads_and_positions_enter_only_through_rope():
    mla = make_mla()
    x = torch.randn(2, 6, 32)
    pos = torch.arange(6)
    with torch.no_grad():
        _, q_rope, _, k_rope = mla._project(x, pos)
        assert k_rope.shape == (2, 6, DR)  # no head dimension: one key for all heads
        assert q_rope.shape == (2, NH, 6, DR)
        base = mla(x, positions=pos)
        # RoPE is relative: a uniform shift of all positions leaves the output unchanged ...
        torch.testing.assert_close(mla(x, positions=pos + 11), base, atol=1e-5, rtol=1e-5)
        # ... while changing the distances between tokens changes it.
        spread = torch.tensor([0, 1, 5, 6, 20, 21])
        assert not torch.allclose(mla(x, positions=spread), base, atol=1e-4)
        # Zeroing the query's RoPE rows removes every trace of position.
        w = mla.q_proj.weight.view(NH, D + DR, 32)
        w[:, D:] = 0
        torch.testing.assert_close(mla(x, positions=spread), mla(x, positions=pos))


@pytest.mark.parametrize("q_rank", [None, 6])
def test_every_parameter_gets_gradient(q_rank):
    mla = make_mla(mla_q_rank=q_rank).train()
    out = mla(torch.randn(2, 7, 32), positions=torch.arange(7))
    (out * torch.randn_like(out)).sum().backward()
    for name, p in mla.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_mu_prev_is_ignored():
    mla = make_mla()
    x = torch.randn(1, 4, 32)
    with torch.no_grad():
        torch.testing.assert_close(
            mla(x, positions=torch.arange(4), mu_prev=torch.randn(1, 4, 32)),
            mla(x, positions=torch.arange(4)),
        )


def test_cache_overflow_raises_with_sizes():
    mla = make_mla()
    cache = mla.new_cache(1, 4, torch.device("cpu"), torch.float32)
    with torch.no_grad():
        mla(torch.randn(1, 3, 32), positions=torch.arange(3), cache=cache)
        with pytest.raises(ValueError, match=r"holds 4 tokens; 5 requested"):
            mla(torch.randn(1, 2, 32), positions=torch.arange(3, 5), cache=cache)
    assert cache.length == 3
