"""Training window samplers and held-out evaluation windows."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from hybridlm.data import (
    TokenStream,
    WindowSampler,
    iter_eval_windows,
    load_prepared,
    num_eval_windows,
)

TOKENS = np.arange(10_000, dtype=np.uint16)  # token i has value i: windows are easy to check


def test_window_sampler_on_a_prepared_split(prepared_dir: Path) -> None:
    data = load_prepared(prepared_dir)
    w = WindowSampler(data.split("train"), 64, 2, seed=0).batch(0)
    assert w.shape == (2, 65) and int(w.max()) < data.vocab_size


def _sharded(tokens: np.ndarray, cuts: list[int]) -> TokenStream:
    return TokenStream(np.split(tokens, cuts))


def test_samplers_on_sharded_streams() -> None:
    """Windows spanning shard boundaries read the same tokens as the flat array."""
    stream = _sharded(TOKENS, [5, 17, 18, 400, 401, 5000])
    w1, w2 = WindowSampler(stream, 9, 32, seed=1), WindowSampler(TOKENS, 9, 32, seed=1)
    for step in range(40):
        assert torch.equal(w1.batch(step), w2.batch(step))
    for x, y in zip(iter_eval_windows(stream, 7, 64), iter_eval_windows(TOKENS, 7, 64),
                    strict=True):
        assert torch.equal(x, y)


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
        iter_eval_windows(short, seq_len=16, batch_size=2)  # raised eagerly, before next()
    with pytest.raises(ValueError, match="max_batches"):
        iter_eval_windows(TOKENS, seq_len=8, batch_size=2, max_batches=0)


# ---------------------------------------------------------------------- WindowSampler
GRID = np.arange(1001, dtype=np.uint16)  # seq_len 10 -> exactly 100 windows


def test_window_sampler_grid_and_shapes() -> None:
    sampler = WindowSampler(GRID, seq_len=10, global_batch=8, seed=0)
    assert sampler.num_windows == 100 and sampler.steps_per_epoch == 12.5
    w = sampler.batch(0)
    assert w.shape == (8, 11) and w.dtype == torch.int64
    assert torch.equal(w[:, 1:], w[:, :-1] + 1) and bool((w[:, 0] % 10 == 0).all())
    assert torch.equal(w[:, 0], torch.from_numpy(sampler.starts(0)))
    assert WindowSampler(np.arange(11), 10, 4).batch(7).tolist() == [list(range(11))] * 4


def test_window_sampler_follows_the_epoch_permutations() -> None:
    sampler = WindowSampler(GRID, seq_len=10, global_batch=8, seed=5)
    order = np.concatenate([np.random.default_rng([5, e]).permutation(100) for e in range(3)])
    for step in range(30):
        np.testing.assert_array_equal(sampler.window_indices(step), order[step * 8:step * 8 + 8])
    # no repeats within an epoch; epoch 0 ends inside step 12
    first_epoch = np.concatenate([sampler.window_indices(s) for s in range(13)])[:100]
    assert sorted(first_epoch.tolist()) == list(range(100))
    assert [sampler.epoch_of(s) for s in (0, 12, 13, 24, 25)] == [0, 0, 1, 1, 2]
    crossing = sampler.window_indices(12)
    np.testing.assert_array_equal(crossing[4:], np.random.default_rng([5, 1]).permutation(100)
                                  [:4])


def test_window_sampler_is_deterministic_and_resumable() -> None:
    a = WindowSampler(GRID, 10, 8, seed=1)
    steps = [a.batch(s) for s in range(40)]
    b = WindowSampler(GRID.copy(), 10, 8, seed=1)  # a fresh process resuming at step 31
    for s in (31, 17, 39, 0):
        assert torch.equal(b.batch(s), steps[s])
    assert not torch.equal(steps[0], steps[1])
    assert not torch.equal(WindowSampler(GRID, 10, 8, seed=2).batch(0), steps[0])


@pytest.mark.parametrize("world_size", [1, 2, 4, 8])
def test_window_sampler_ranks_partition_the_global_batch(world_size: int) -> None:
    sampler = WindowSampler(GRID, 10, 8, seed=3)
    for step in (0, 5, 12, 13, 77):
        parts = [sampler.batch(step, rank, world_size) for rank in range(world_size)]
        assert all(p.shape == (8 // world_size, 11) for p in parts)
        assert torch.equal(torch.cat(parts), sampler.batch(step))
        idx = [set(sampler.window_indices(step, r, world_size).tolist())
               for r in range(world_size)]
        assert sum(len(i) for i in idx) == len(set().union(*idx)) == 8  # disjoint


def test_window_sampler_errors() -> None:
    sampler = WindowSampler(GRID, 10, 8)
    with pytest.raises(ValueError, match="global_batch=8 is not divisible by world_size=3"):
        sampler.batch(0, 0, 3)
    with pytest.raises(ValueError, match="world_size must be >= 1, got 0"):
        sampler.batch(0, 0, 0)
    with pytest.raises(ValueError, match=r"rank must be in \[0, world_size=2\), got 2"):
        sampler.batch(0, 2, 2)
    with pytest.raises(ValueError, match="got -1"):
        sampler.batch(0, -1, 2)
    with pytest.raises(ValueError, match="step"):
        sampler.batch(-1)
    with pytest.raises(ValueError, match="split has 10 tokens, fewer than one window"):
        WindowSampler(np.arange(10), 10, 8)
    with pytest.raises(ValueError, match="global_batch"):
        WindowSampler(GRID, 10, 0)
    with pytest.raises(ValueError, match="seq_len"):
        WindowSampler(GRID, 0, 8)
