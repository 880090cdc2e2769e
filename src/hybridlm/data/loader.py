"""Batches of next-token-prediction windows from a flat token array.

* :class:`BatchSampler` draws random training windows; batch ``step`` depends only on
  ``(seed, step)``, so a resumed run sees exactly the batches it would have seen.
* :func:`iter_eval_windows` walks a held-out split in contiguous, non-overlapping windows.

Both return int64 windows of shape (B, T + 1): a window is passed to the model as both
``input_ids`` and ``labels`` (the model shifts labels inside, as HF transformers does), so
each window trains T next-token predictions.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

Batch = torch.Tensor  # (B, T + 1) int64 token windows


def _check_tokens(tokens: np.ndarray, seq_len: int) -> int:
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    if tokens.ndim != 1:
        raise ValueError(f"tokens must be a 1-D array, got shape {tokens.shape}")
    n = int(tokens.shape[0])
    if n < seq_len + 1:
        raise ValueError(
            f"split has {n} tokens, fewer than seq_len + 1 = {seq_len + 1}; "
            "use a shorter seq_len or more data"
        )
    return n


def _to_batch(windows: np.ndarray) -> Batch:
    """(B, T + 1) token windows -> an int64 tensor (B, T + 1)."""
    return torch.from_numpy(windows.astype(np.int64, copy=False))


class BatchSampler:
    """Random fixed-length windows, deterministic in ``(seed, step)``.

    Args:
        tokens: flat token ids (N,), e.g. ``PreparedData.split("train")`` (a memmap is fine).
        batch_size: windows per batch ``B``.
        seq_len: window length ``T``; each window reads ``T + 1`` tokens.
        seed: base seed; batch ``step`` uses ``numpy.random.default_rng([seed, step])``.
    """

    def __init__(self, tokens: np.ndarray, batch_size: int, seq_len: int, seed: int = 0) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.n_tokens = _check_tokens(tokens, seq_len)
        self.tokens = tokens
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.seed = seed
        self._offsets = np.arange(seq_len + 1, dtype=np.int64)

    def starts(self, step: int) -> np.ndarray:
        """Start positions (B,) of the windows of batch ``step``, in ``[0, N - T - 1]``."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        rng = np.random.default_rng([self.seed, step])
        return rng.integers(0, self.n_tokens - self.seq_len, size=self.batch_size, dtype=np.int64)

    def batch(self, step: int) -> Batch:
        """Return the windows of batch ``step``: a LongTensor of shape (B, T + 1)."""
        idx = self.starts(step)[:, None] + self._offsets[None, :]
        return _to_batch(np.asarray(self.tokens[idx]))

    def __iter__(self) -> Iterator[Batch]:
        """Endless stream of batches for steps 0, 1, 2, ..."""
        step = 0
        while True:
            yield self.batch(step)
            step += 1


def num_eval_windows(n_tokens: int, seq_len: int) -> int:
    """Number of contiguous, non-overlapping windows of length ``seq_len`` in ``n_tokens``."""
    return max(0, (n_tokens - 1) // seq_len)


def iter_eval_windows(
    tokens: np.ndarray, seq_len: int, batch_size: int, max_batches: int | None = None
) -> Iterator[Batch]:
    """Yield batches of contiguous windows, each (B, T + 1).

    Window ``i`` is ``tokens[i*T : i*T + T + 1]``: consecutive windows share one token, so
    every token after the first is predicted at most once. The last batch may have fewer
    than ``batch_size`` rows; a tail shorter than ``T`` is dropped. At most ``max_batches``
    batches are yielded when it is given.

    Raises:
        ValueError: fewer than ``seq_len + 1`` tokens, ``batch_size`` < 1 or
            ``max_batches`` < 1 (raised at the call, not at the first ``next``).
    """
    n = _check_tokens(tokens, seq_len)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if max_batches is not None and max_batches < 1:
        raise ValueError(f"max_batches must be >= 1 or None, got {max_batches}")
    n_windows = num_eval_windows(n, seq_len)
    n_batches = -(-n_windows // batch_size)
    if max_batches is not None:
        n_batches = min(n_batches, max_batches)
    offsets = np.arange(seq_len + 1, dtype=np.int64)

    def generate() -> Iterator[Batch]:
        for b in range(n_batches):
            first, last = b * batch_size, min((b + 1) * batch_size, n_windows)
            starts = np.arange(first, last, dtype=np.int64) * seq_len
            yield _to_batch(np.asarray(tokens[starts[:, None] + offsets[None, :]]))

    return generate()
