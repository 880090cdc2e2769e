"""Training batch sampler and held-out evaluation windows."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from hybridlm.data import BatchSampler, iter_eval_windows, load_prepared, num_eval_windows

TOKENS = np.arange(10_000, dtype=np.uint16)  # token i has value i: windows are easy to check


def test_batch_shapes_and_shift() -> None:
    w = BatchSampler(TOKENS, batch_size=4, seq_len=16, seed=0).batch(0)
    assert w.shape == (4, 17) and w.dtype == torch.int64
    torch.testing.assert_close(w[:, 1:], w[:, :-1] + 1)  # a window is contiguous text
    assert int(w.min()) >= 0 and int(w.max()) <= TOKENS.size - 1


def test_batch_determinism() -> None:
    a = BatchSampler(TOKENS, batch_size=8, seq_len=32, seed=1)
    b = BatchSampler(TOKENS.copy(), batch_size=8, seq_len=32, seed=1)
    for step in (0, 5, 123456):
        torch.testing.assert_close(a.batch(step), b.batch(step))
    assert not torch.equal(a.batch(0), a.batch(1))
    other_seed = BatchSampler(TOKENS, batch_size=8, seq_len=32, seed=2)
    assert not torch.equal(a.batch(0), other_seed.batch(0))
    batches = iter(a)
    torch.testing.assert_close(next(batches), a.batch(0))
    torch.testing.assert_close(next(batches), a.batch(1))


def test_batch_covers_whole_range() -> None:
    tokens = np.arange(11, dtype=np.uint16)
    sampler = BatchSampler(tokens, batch_size=64, seq_len=10, seed=0)
    w = sampler.batch(3)
    assert torch.equal(w, torch.arange(11).expand(64, 11))  # the only window that fits
    starts = np.concatenate([BatchSampler(TOKENS, 64, 100, 0).starts(s) for s in range(50)])
    assert starts.min() >= 0 and starts.max() <= TOKENS.size - 101
    assert starts.max() > TOKENS.size - 400  # the end of the array is reachable


def test_batch_from_memmap(prepared_dir: Path) -> None:
    data = load_prepared(prepared_dir)
    w = BatchSampler(data.split("train"), batch_size=2, seq_len=64, seed=0).batch(0)
    assert w.shape == (2, 65) and int(w.max()) < data.vocab_size


def test_eval_windows_contiguous() -> None:
    tokens = np.arange(1000, dtype=np.uint16)
    batches = list(iter_eval_windows(tokens, seq_len=30, batch_size=4))
    n_windows = num_eval_windows(1000, 30)
    assert n_windows == 33 and len(batches) == 9
    assert [b.shape[0] for b in batches] == [4] * 8 + [1]
    windows = torch.cat(batches)  # (33, 31)
    inputs, labels = windows[:, :-1].flatten(), windows[:, 1:].flatten()
    assert torch.equal(inputs, torch.arange(n_windows * 30))  # every position once
    assert torch.equal(labels, torch.arange(1, n_windows * 30 + 1))  # every target once
    assert len(list(iter_eval_windows(tokens, 30, 4, max_batches=2))) == 2
    exact = list(iter_eval_windows(np.arange(31), seq_len=10, batch_size=8))
    assert len(exact) == 1 and exact[0].shape == (3, 11)


def test_short_split_errors() -> None:
    short = np.arange(16, dtype=np.uint16)
    with pytest.raises(ValueError, match="fewer than seq_len"):
        BatchSampler(short, batch_size=2, seq_len=16, seed=0)
    with pytest.raises(ValueError, match="fewer than seq_len"):
        iter_eval_windows(short, seq_len=16, batch_size=2)  # raised eagerly, before next()
    with pytest.raises(ValueError, match="batch_size"):
        BatchSampler(TOKENS, batch_size=0, seq_len=8, seed=0)
    with pytest.raises(ValueError, match="max_batches"):
        iter_eval_windows(TOKENS, seq_len=8, batch_size=2, max_batches=0)
    with pytest.raises(ValueError, match="step"):
        BatchSampler(TOKENS, batch_size=1, seq_len=8, seed=0).batch(-1)
