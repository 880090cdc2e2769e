"""Unigram baseline: the loss a model gets by predicting token frequencies, ignoring context.

A language model should beat this number quickly; if it does not, something is wrong.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np

from .stream import TokenStream


def unigram_probs(train_counts: np.ndarray, smoothing: float = 1.0) -> np.ndarray:
    """Add-k smoothed unigram distribution (V,): ``(count + k) / (total + k * V)``."""
    counts = np.asarray(train_counts, dtype=np.float64)
    if counts.ndim != 1 or counts.size == 0:
        raise ValueError(f"train_counts must be a non-empty 1-D array, got shape {counts.shape}")
    if np.any(counts < 0):
        raise ValueError("train_counts must be non-negative")
    if smoothing < 0:
        raise ValueError(f"smoothing must be >= 0, got {smoothing}")
    denom = counts.sum() + smoothing * counts.size
    if denom <= 0:
        raise ValueError("train_counts are all zero and smoothing is 0: no distribution")
    return (counts + smoothing) / denom


def _token_chunks(tokens: Any, chunk: int = 1 << 22) -> Iterator[np.ndarray]:
    if isinstance(tokens, TokenStream):
        yield from tokens.iter_chunks(chunk)
        return
    arr = np.asarray(tokens).ravel()  # a memmap stays a memmap: slices are read lazily
    for pos in range(0, arr.size, chunk):
        yield arr[pos:pos + chunk]


def unigram_loss(train_counts: np.ndarray, eval_tokens: Any, smoothing: float = 1.0) -> float:
    """Cross-entropy (nats per token) of an add-k unigram model on ``eval_tokens``.

    Args:
        train_counts: (V,) count of each token id in the training split.
        eval_tokens: (N,) token ids to score, each in ``[0, V)``: an array or a
            :class:`~hybridlm.data.stream.TokenStream` (read in chunks).
        smoothing: add-k constant ``k`` (``k = 0`` gives ``inf`` if an eval id was never seen).

    Returns:
        ``-mean(log p(eval_tokens))`` with ``p = (count + k) / (sum(counts) + k * V)``.
    """
    probs = unigram_probs(train_counts, smoothing)
    eval_counts = np.zeros(probs.size, dtype=np.int64)
    n, lo, hi = 0, None, None
    for chunk in _token_chunks(eval_tokens):
        if chunk.size == 0:
            continue
        cmin, cmax = chunk.min(), chunk.max()
        lo = cmin if lo is None else min(lo, cmin)
        hi = cmax if hi is None else max(hi, cmax)
        n += chunk.size
        if lo >= 0 and hi < probs.size:
            eval_counts += np.bincount(chunk.astype(np.int64), minlength=probs.size)
    if n == 0:
        raise ValueError("eval_tokens is empty")
    if lo < 0 or hi >= probs.size:
        raise ValueError(
            f"eval_tokens must be ids in [0, {probs.size}), got range [{lo}, {hi}]"
        )
    used = eval_counts > 0
    if np.any(probs[used] == 0):
        return math.inf
    return float(-(eval_counts[used] * np.log(probs[used])).sum() / n)
