"""Mamba mixer: cached decoding, cache size, causality, gradients, initialisation, training.

Glossary: B batch, T tokens, H hidden, Din inner width, N state size, K conv width.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hybridlm.config import ModelConfig
from hybridlm.layers.mamba import DT_MAX, DT_MIN, Mamba

HIDDEN, STATE, CONV = 16, 8, 4


def make_mamba(seed: int = 0, **overrides) -> Mamba:
    # chunk 4: a 9-token forward already spans three chunks, the last one partial.
    fields = dict(
        vocab_size=97, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, intermediate_size=32, mixer_pattern="M", mamba_d_state=STATE,
        mamba_d_conv=CONV, mamba_chunk_size=4,
    )
    torch.manual_seed(seed)
    return Mamba(ModelConfig(**{**fields, **overrides}), 0)


def run_in_pieces(mamba: Mamba, x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    cache = mamba.new_cache(x.shape[0], 64, x.device, x.dtype)
    outs, start = [], 0
    for size in sizes:
        piece = x[:, start : start + size]
        outs.append(mamba(piece, positions=torch.arange(start, start + size), cache=cache))
        start += size
    assert cache.length == x.shape[1]
    return torch.cat(outs, dim=1)


def make_stateful_mamba(seed: int = 0) -> Mamba:
    """A Mamba whose output depends strongly on its recurrent state, for the cache tests.

    At init the skip D * x dominates and the state adds ~0.2% of the output, too little for a
    parity test to notice a cache that drops it. Here D = 0 (the output passes through the
    state alone), steps of 0.05-0.2 (the state remembers ~10 tokens) and B, C scaled x5,
    out_proj x20 (outputs of order 1): dropping the SSM or the conv state then moves the
    output by ~0.3-1, against a float32 parity error of ~5e-7."""
    mamba = make_mamba(seed)
    with torch.no_grad():
        steps = torch.empty(mamba.inner).uniform_(0.05, 0.2)  # (Din,)
        mamba.dt_proj.bias.copy_(steps + torch.log(-torch.expm1(-steps)))  # inverse softplus
        mamba.x_proj.weight[mamba.dt_rank :].mul_(5.0)  # the B and C rows
        mamba.out_proj.weight.mul_(20.0)
        mamba.D.zero_()
    return mamba


TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2}  # atol = rtol of the cache parity;
# measured errors: ~5e-7 (fp32), 0 to a few bf16 ulps (~2e-3 at outputs ~0.5)


@pytest.mark.parametrize("sizes", [[1] * 9, [4, 1, 3, 1], [9]], ids=["tokens", "mixed", "one"])
def test_cached_decoding_equals_full_forward(sizes: list[int]):
    mamba = make_stateful_mamba()
    x = torch.randn(2, 9, HIDDEN, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = mamba(x, positions=torch.arange(9))
        pieces = run_in_pieces(mamba, x, sizes)
    tol = TOLERANCE[torch.float32]
    torch.testing.assert_close(pieces, full, atol=tol, rtol=tol)


def test_cached_decoding_in_bf16_stays_close_to_full_forward():
    mamba = make_stateful_mamba().to(torch.bfloat16)
    x = torch.randn(2, 9, HIDDEN, generator=torch.Generator().manual_seed(1)).bfloat16()
    with torch.no_grad():
        full = mamba(x, positions=torch.arange(9))
        pieces = run_in_pieces(mamba, x, [4, 1, 3, 1])
    assert full.dtype == pieces.dtype == torch.bfloat16
    tol = TOLERANCE[torch.bfloat16]
    torch.testing.assert_close(pieces.float(), full.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("breakage", ["mamba_ssm_state_dropped", "mamba_conv_state_dropped"])
def test_a_cache_that_drops_a_state_fails_the_parity(break_cache, breakage, dtype):
    mamba = make_stateful_mamba().to(dtype)
    x = torch.randn(2, 9, HIDDEN, generator=torch.Generator().manual_seed(1)).to(dtype)
    with torch.no_grad():
        full = mamba(x, positions=torch.arange(9)).float()
        break_cache(breakage)
        errors = [(run_in_pieces(mamba, x, sizes).float() - full).abs().amax()
                  for sizes in ([1] * 9, [4, 1, 3, 1])]
    assert min(errors) > 10 * TOLERANCE[dtype] * max(1.0, float(full.abs().amax())), errors


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cache_size_is_fixed_and_as_expected(dtype: torch.dtype):
    mamba = make_mamba()
    inner = mamba.inner
    assert inner == 2 * HIDDEN
    small = mamba.new_cache(3, 8, torch.device("cpu"), dtype)
    large = mamba.new_cache(3, 4096, torch.device("cpu"), dtype)
    elem = torch.finfo(dtype).bits // 8
    expected = 3 * inner * (CONV - 1) * elem + 3 * inner * STATE * 4
    assert small.nbytes() == large.nbytes() == expected
    assert small.ssm_state.dtype == torch.float32 and small.conv_state.dtype == dtype
    meta = mamba.new_cache(3, 8, torch.device("meta"), dtype)  # sized without allocating
    assert meta.nbytes() == expected


def test_future_tokens_do_not_change_the_past():
    mamba = make_mamba()
    x = torch.randn(2, 11, HIDDEN)
    changed = x.clone()
    changed[:, 6:] = torch.randn(2, 5, HIDDEN)
    with torch.no_grad():
        a = mamba(x, positions=torch.arange(11))
        b = mamba(changed, positions=torch.arange(11))
    torch.testing.assert_close(a[:, :6], b[:, :6])
    assert not torch.allclose(a[:, 6:], b[:, 6:])


def test_positions_and_mu_are_ignored():
    mamba = make_mamba()
    x = torch.randn(1, 5, HIDDEN)
    with torch.no_grad():
        plain = mamba(x, positions=torch.arange(5))
        other = mamba(x, positions=torch.arange(10, 15), mu_prev=torch.randn(1, 5, HIDDEN))
    torch.testing.assert_close(plain, other)


def test_every_parameter_gets_a_gradient():
    mamba = make_mamba()
    out = mamba(torch.randn(2, 7, HIDDEN), positions=torch.arange(7))
    out.pow(2).mean().backward()
    for name, param in mamba.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def _check_ssm_init(mamba: Mamba) -> None:
    a = -torch.exp(mamba.A_log)  # (Din, N)
    expected = -torch.arange(1, STATE + 1, dtype=torch.float32).expand(mamba.inner, -1)
    torch.testing.assert_close(a, expected)
    torch.testing.assert_close(mamba.D, torch.ones(mamba.inner))
    dt = F.softplus(mamba.dt_proj.bias)
    assert dt.min() >= DT_MIN * (1 - 1e-4) and dt.max() <= DT_MAX * (1 + 1e-4)
    assert dt.max() / dt.min() > 5  # spread over the range, not a constant
    bound = mamba.dt_rank**-0.5
    assert mamba.dt_proj.weight.abs().max() <= bound
    assert mamba.dt_proj.weight.std() > bound / 4  # uniform(+-bound), not normal(0, 0.02)


def test_initialisation_follows_mamba():
    mamba = make_mamba()
    assert mamba.dt_rank == 1  # ceil(16 / 16)
    _check_ssm_init(mamba)
    assert mamba.A_log._no_weight_decay and mamba.D._no_weight_decay


def test_reset_parameters_overrides_a_generic_linear_init():
    mamba = make_mamba()
    with torch.no_grad():  # what a model-wide init does to every Linear first
        for module in mamba.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0.0, 0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        mamba.A_log.zero_()
        mamba.D.zero_()
    mamba.reset_parameters()
    _check_ssm_init(mamba)


# Key recall: a key (one of KEYS ids) opens each sequence, random distractor ids follow, and
# every position must name the key. From RECALL_FROM on the key lies more than twice the
# conv width back, so only the SSM state can carry it there; a model without that memory can
# do no better than guessing, log(KEYS) nats.
KEYS, DISTRACTORS, RECALL_LEN, RECALL_FROM = 8, 8, 16, 9


def _key_recall_batch(batch: int, generator: torch.Generator) -> torch.Tensor:
    seq = torch.randint(KEYS, KEYS + DISTRACTORS, (batch, RECALL_LEN), generator=generator)
    seq[:, 0] = torch.randint(0, KEYS, (batch,), generator=generator)
    return seq  # (B, T); the key is seq[:, 0]


def _held_out_recall_loss_after_training(steps: int = 100) -> float:
    """Train embed -> Mamba -> head on fresh batches; cross-entropy of naming the key at
    positions >= RECALL_FROM on a held-out batch."""
    torch.manual_seed(0)
    mamba = make_mamba(seed=0, mamba_chunk_size=8)
    embed, head = nn.Embedding(KEYS + DISTRACTORS, HIDDEN), nn.Linear(HIDDEN, KEYS)
    params = [*mamba.parameters(), *embed.parameters(), *head.parameters()]
    opt = torch.optim.AdamW(params, lr=2e-2)
    positions = torch.arange(RECALL_LEN)

    def recall_loss(seq: torch.Tensor, first: int) -> torch.Tensor:
        h = embed(seq)  # (B, T, H)
        logits = head(h + mamba(h, positions=positions))[:, first:]  # (B, T - first, KEYS)
        keys = seq[:, :1].expand(-1, RECALL_LEN - first)  # (B, T - first)
        return F.cross_entropy(logits.reshape(-1, KEYS), keys.reshape(-1))

    train_gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        # Every position is trained (near ones reach the key through the conv too), which
        # gives the SSM a gradient from the first steps on.
        loss = recall_loss(_key_recall_batch(16, train_gen), first=1)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
    held_out = _key_recall_batch(256, torch.Generator().manual_seed(1))
    with torch.no_grad():
        return recall_loss(held_out, first=RECALL_FROM).item()


def test_recalls_a_key_from_beyond_the_conv_window():
    assert RECALL_FROM > 2 * CONV
    loss = _held_out_recall_loss_after_training()
    assert loss < 0.5 * math.log(KEYS), loss  # guessing: log(KEYS) = 2.08 nats


def test_key_recall_fails_when_the_ssm_state_is_reset_every_step(monkeypatch):
    # The breakage the test above must catch: a state that forgets everything but the current
    # token leaves only the conv's CONV-token window, so the key can't be recalled.
    from hybridlm.layers import mamba as mamba_module

    scan = mamba_module.selective_scan

    def forgetful_scan(u, *args, reset=None):
        return scan(u, *args, reset=torch.ones(u.shape[:2], dtype=torch.bool))

    monkeypatch.setattr(mamba_module, "selective_scan", forgetful_scan)
    loss = _held_out_recall_loss_after_training()
    assert loss > 0.9 * math.log(KEYS), loss
