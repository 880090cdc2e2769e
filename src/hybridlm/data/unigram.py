"""Unigram baseline: the loss a model gets by predicting token frequencies, ignoring context.

A language model should beat this number quickly; if it does not, something is wrong.
"""

from __future__ import annotations

import math

import numpy as np


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


def unigram_loss(
    train_counts: np.ndarray, eval_tokens: np.ndarray, smoothing: float = 1.0
) -> float:
    """Cross-entropy (nats per token) of an add-k unigram model on ``eval_tokens``.

    Args:
        train_counts: (V,) count of each token id in the training split.
        eval_tokens: (N,) token ids to score, each in ``[0, V)``.
        smoothing: add-k constant ``k`` (``k = 0`` gives ``inf`` if an eval id was never seen).

    Returns:
        ``-mean(log p(eval_tokens))`` with ``p = (count + k) / (sum(counts) + k * V)``.
    """
    probs = unigram_probs(train_counts, smoothing)
    tokens = np.asarray(eval_tokens).ravel()
    if tokens.size == 0:
        raise ValueError("eval_tokens is empty")
    if tokens.min() < 0 or tokens.max() >= probs.size:
        raise ValueError(
            f"eval_tokens must be ids in [0, {probs.size}), got range "
            f"[{tokens.min()}, {tokens.max()}]"
        )
    eval_counts = np.bincount(tokens.astype(np.int64), minlength=probs.size)
    used = eval_counts > 0
    if np.any(probs[used] == 0):
        return math.inf
    return float(-(eval_counts[used] * np.log(probs[used])).sum() / tokens.size)
