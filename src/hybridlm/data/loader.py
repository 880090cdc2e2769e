"""Batches of next-token-prediction windows from a flat token array or a TokenStream.

* :class:`WindowSampler` cuts the training split into non-overlapping windows and walks
  them in a fresh permutation every epoch; batch ``step`` of rank ``r`` depends only on
  ``(seed, step, r, world_size)``, so a resumed or data-parallel run sees exactly the windows
  a single uninterrupted process with the same global batch sees.
* :func:`iter_eval_windows` walks a held-out split in contiguous, non-overlapping windows.

All return int64 windows of shape (B, T + 1): a window is passed to the model as both
``input_ids`` and ``labels`` (the model shifts labels inside, as HF transformers does), so
each window trains T next-token predictions.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from .stream import TokenStream

Batch = torch.Tensor  # (B, T + 1) int64 token windows
Tokens = np.ndarray | TokenStream


def _check_tokens(tokens: Tokens, seq_len: int) -> int:
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
    arr = np.asarray(windows)
    if arr.dtype != np.int64 or not arr.flags.writeable:
        arr = arr.astype(np.int64)
    return torch.from_numpy(arr)


def _windows(tokens: Tokens, starts: np.ndarray, length: int) -> Batch:
    """Rows ``tokens[s : s + length]`` for every start ``s``, as an int64 tensor."""
    if isinstance(tokens, TokenStream):
        return _to_batch(tokens.windows(starts, length))
    idx = starts[:, None] + np.arange(length, dtype=np.int64)[None, :]
    return _to_batch(np.asarray(tokens[idx]))


def num_eval_windows(n_tokens: int, seq_len: int) -> int:
    """Number of contiguous, non-overlapping windows of length ``seq_len`` in ``n_tokens``."""
    return max(0, (n_tokens - 1) // seq_len)


def iter_eval_windows(
    tokens: Tokens, seq_len: int, batch_size: int, max_batches: int | None = None
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

    def generate() -> Iterator[Batch]:
        for b in range(n_batches):
            first, last = b * batch_size, min((b + 1) * batch_size, n_windows)
            starts = np.arange(first, last, dtype=np.int64) * seq_len
            yield _windows(tokens, starts, seq_len + 1)

    return generate()


class WindowSampler:
    """Non-overlapping windows in a per-epoch permutation: deterministic, resumable and
    rank-aware.

    The stream is cut into ``W = (N - 1) // T`` windows on a fixed grid, window ``i`` being
    ``tokens[i*T : i*T + T + 1]`` (so consecutive windows share one token and every position
    is a target once per epoch). Epoch ``e`` visits the windows in the order
    ``numpy.random.default_rng([seed, e]).permutation(W)``; the epochs' orders are
    concatenated and global step ``s`` takes positions ``[s*G, (s+1)*G)`` of that sequence,
    ``G`` being ``global_batch``. Rank ``r`` of ``world_size`` ranks takes rows
    ``[r*G/world_size, (r+1)*G/world_size)`` of the global batch.

    So a batch depends only on ``(seed, step, rank, world_size)``; the ranks' rows are
    disjoint and together form the single-process global batch of that step; no window
    repeats within an epoch (a step may straddle two epochs).

    Args:
        tokens: flat token ids (N,): an array or ``PreparedData.split("train")``.
        seq_len: window length ``T``; each window reads ``T + 1`` tokens.
        global_batch: windows per step over all ranks, ``G``.
        seed: base seed (>= 0).

    Raises:
        ValueError: fewer than ``seq_len + 1`` tokens, ``seq_len``, ``global_batch`` < 1
            or ``seed`` < 0.
    """

    def __init__(self, tokens: Tokens, seq_len: int, global_batch: int, seed: int = 0) -> None:
        if global_batch < 1:
            raise ValueError(f"global_batch must be >= 1, got {global_batch}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        n = len(tokens)
        if n < seq_len + 1:
            raise ValueError(
                f"split has {n} tokens, fewer than one window of seq_len + 1 = {seq_len + 1}; "
                "use a shorter seq_len or more data"
            )
        self.tokens = tokens
        self.n_tokens = n
        self.seq_len = seq_len
        self.global_batch = global_batch
        self.seed = seed
        self.num_windows = num_eval_windows(n, seq_len)
        self._perms: dict[int, np.ndarray] = {}

    @property
    def steps_per_epoch(self) -> float:
        """Steps that make one pass over all windows (``num_windows / global_batch``)."""
        return self.num_windows / self.global_batch

    def epoch_of(self, step: int) -> int:
        """Epoch of the first window of global step ``step``."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        return step * self.global_batch // self.num_windows

    def permutation(self, epoch: int) -> np.ndarray:
        """Window order of ``epoch``: a permutation of ``0 .. num_windows - 1``."""
        perm = self._perms.get(epoch)
        if perm is None:
            perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_windows)
            if self.num_windows < 2**31:
                perm = perm.astype(np.int32)  # half the memory; same order
            if len(self._perms) >= 2:
                self._perms.pop(min(self._perms))
            self._perms[epoch] = perm
        return perm

    def _check(self, step: int, rank: int, world_size: int) -> int:
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        if self.global_batch % world_size:
            raise ValueError(
                f"global_batch={self.global_batch} is not divisible by world_size={world_size}"
            )
        return self.global_batch // world_size

    def window_indices(self, step: int, rank: int = 0, world_size: int = 1) -> np.ndarray:
        """Grid indices (int64) of the windows rank ``rank`` gets at ``step``."""
        per_rank = self._check(step, rank, world_size)
        first = step * self.global_batch + rank * per_rank
        positions = np.arange(first, first + per_rank, dtype=np.int64)
        epochs, within = np.divmod(positions, self.num_windows)
        out = np.empty(per_rank, dtype=np.int64)
        for e in np.unique(epochs).tolist():
            sel = epochs == e
            out[sel] = self.permutation(int(e))[within[sel]]
        return out

    def starts(self, step: int, rank: int = 0, world_size: int = 1) -> np.ndarray:
        """Token offsets (int64) of the windows rank ``rank`` gets at ``step``."""
        return self.window_indices(step, rank, world_size) * self.seq_len

    def batch(self, step: int, rank: int = 0, world_size: int = 1) -> Batch:
        """Rank ``rank``'s windows of global step ``step``: a LongTensor
        ``(global_batch / world_size, seq_len + 1)``."""
        return _windows(self.tokens, self.starts(step, rank, world_size), self.seq_len + 1)
