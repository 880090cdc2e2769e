"""Unigram cross-entropy baseline."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from hybridlm.data import TokenStream, load_prepared, unigram_loss


def test_hand_computed_value() -> None:
    counts = np.array([3, 1, 0], dtype=np.int64)
    # add-one: p = [(3+1)/7, (1+1)/7, (0+1)/7]
    expected = -(2 * math.log(4 / 7) + math.log(2 / 7) + math.log(1 / 7)) / 4
    assert unigram_loss(counts, np.array([0, 1, 2, 0])) == pytest.approx(expected, rel=1e-12)
    # add-0.5: p = [3.5/5.5, 1.5/5.5, 0.5/5.5]
    assert unigram_loss(counts, np.array([1]), smoothing=0.5) == pytest.approx(
        -math.log(1.5 / 5.5), rel=1e-12)


def test_no_smoothing() -> None:
    counts = np.array([1, 1, 0])
    assert unigram_loss(counts, np.array([0, 1]), smoothing=0.0) == pytest.approx(math.log(2))
    assert unigram_loss(counts, np.array([0, 2]), smoothing=0.0) == math.inf


def test_uniform_counts_give_log_vocab() -> None:
    assert unigram_loss(np.full(64, 10), np.arange(64)) == pytest.approx(math.log(64))


def test_real_data_beats_uniform(prepared_dir: Path) -> None:
    data = load_prepared(prepared_dir)
    loss = unigram_loss(data.token_counts, data.split("validation"))
    assert 2.0 < loss < math.log(data.vocab_size)


def test_token_stream_in_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    import hybridlm.data.unigram as unigram

    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 50, size=1000).astype(np.uint16)
    counts = rng.integers(0, 100, size=50)
    stream = TokenStream(np.split(tokens, [10, 11, 600]))
    expected = unigram_loss(counts, tokens)
    real = unigram._token_chunks
    monkeypatch.setattr(unigram, "_token_chunks", lambda t, chunk=64: real(t, 64))
    assert unigram_loss(counts, stream) == pytest.approx(expected, rel=1e-12)
    assert unigram_loss(counts, tokens) == pytest.approx(expected, rel=1e-12)
    with pytest.raises(ValueError, match=r"\[0, 40\), got range \[0, 49\]"):
        unigram_loss(counts[:40], stream)


def test_errors() -> None:
    with pytest.raises(ValueError, match="empty"):
        unigram_loss(np.array([1, 2]), np.array([], dtype=np.int64))
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        unigram_loss(np.array([1, 2]), np.array([0, 2]))
    with pytest.raises(ValueError, match="smoothing"):
        unigram_loss(np.array([1, 2]), np.array([0]), smoothing=-1)
    with pytest.raises(ValueError, match="non-negative"):
        unigram_loss(np.array([1, -2]), np.array([0]))
