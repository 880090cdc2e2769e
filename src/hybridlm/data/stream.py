"""A read-only 1-D token array stored as one or more shards (memory-mapped files).

:class:`TokenStream` behaves like a 1-D numpy array for reading: ``len``, ``dtype``,
``shape``, integer / slice / integer-array indexing (across shard boundaries) and
:meth:`~TokenStream.to_numpy`. Shards are opened lazily and at most ``max_open`` of them stay
mapped at a time, so a split of thousands of shards does not exhaust file descriptors.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

ShardSource = np.ndarray | str | Path


class TokenStream:
    """Read-only view over the concatenation of token shards.

    Args:
        shards: the shards in order: in-memory 1-D arrays, or paths of raw token files
            (mapped read-only with ``np.memmap`` when first read).
        dtype: element type; required when ``shards`` is empty or holds paths.
        lengths: tokens per shard; required for paths (each file must hold exactly that many).
        max_open: most file shards kept mapped at once (least recently used are closed).
    """

    ndim = 1

    def __init__(
        self,
        shards: Sequence[ShardSource],
        dtype: np.dtype | str | type | None = None,
        lengths: Sequence[int] | None = None,
        max_open: int = 64,
    ) -> None:
        shards = list(shards)
        arrays = [s for s in shards if isinstance(s, np.ndarray)]
        if dtype is None:
            if not arrays or len(arrays) != len(shards):
                raise ValueError("dtype is required for empty or file-backed token streams")
            dtype = arrays[0].dtype
        self._dtype = np.dtype(dtype)
        if lengths is None:
            if len(arrays) != len(shards):
                raise ValueError("lengths are required for file-backed shards")
            lengths = [a.shape[0] for a in arrays]
        if len(lengths) != len(shards):
            raise ValueError(f"got {len(shards)} shards but {len(lengths)} lengths")
        for shard, n in zip(shards, lengths, strict=True):
            if isinstance(shard, np.ndarray):
                if shard.ndim != 1 or shard.dtype != self._dtype or shard.shape[0] != n:
                    raise ValueError(
                        f"shards must be 1-D {self._dtype} arrays of the given lengths, got "
                        f"shape {shard.shape} dtype {shard.dtype} (length {n})"
                    )
            if n < 1:
                raise ValueError(f"shards must be non-empty, got a shard of {n} tokens")
        if max_open < 1:
            raise ValueError(f"max_open must be >= 1, got {max_open}")
        self._sources: list[ShardSource] = [
            s if isinstance(s, np.ndarray) else Path(s) for s in shards
        ]
        self._lengths = np.asarray(lengths, dtype=np.int64).reshape(-1)
        self._ends = np.cumsum(self._lengths)
        self._starts = self._ends - self._lengths
        self._n = int(self._ends[-1]) if len(self._ends) else 0
        self._open: OrderedDict[int, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()
        self._max_open = max_open

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_open"] = OrderedDict()  # mapped shards are reopened on demand
        del state["_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ array-like basics
    @property
    def dtype(self) -> np.dtype:
        return self._dtype

    @property
    def shape(self) -> tuple[int]:
        return (self._n,)

    @property
    def size(self) -> int:
        return self._n

    @property
    def nbytes(self) -> int:
        return self._n * self._dtype.itemsize

    @property
    def num_shards(self) -> int:
        return len(self._sources)

    @property
    def shard_starts(self) -> np.ndarray:
        """Global offset (int64) of the first token of every shard."""
        return self._starts.copy()

    def __len__(self) -> int:
        return self._n

    def __repr__(self) -> str:
        return f"TokenStream(tokens={self._n}, shards={self.num_shards}, dtype={self._dtype})"

    def shard(self, k: int) -> np.ndarray:
        """Shard ``k`` as a read-only 1-D array (a memory map for file shards)."""
        source = self._sources[k]
        if isinstance(source, np.ndarray):
            return source
        with self._lock:
            arr = self._open.get(k)
            if arr is not None:
                self._open.move_to_end(k)
                return arr
            arr = self._map(k, source)
            self._open[k] = arr
            while len(self._open) > self._max_open:
                self._open.popitem(last=False)
            return arr

    def _map(self, k: int, source: Path) -> np.ndarray:
        n = int(self._lengths[k])
        actual = source.stat().st_size if source.is_file() else None
        if actual != n * self._dtype.itemsize:
            found = "missing" if actual is None else f"{actual} bytes"
            raise ValueError(
                f"shard {source} should hold {n} {self._dtype} tokens "
                f"({n * self._dtype.itemsize} bytes), found {found}"
            )
        return np.memmap(source, dtype=self._dtype, mode="r", shape=(n,))

    # ------------------------------------------------------------------ reading
    def read(self, start: int, stop: int) -> np.ndarray:
        """Tokens ``[start, stop)`` (0 <= start <= stop <= len) as a 1-D array.

        Within one shard this is a view of the shard; across shards, a copy.
        """
        if not 0 <= start <= stop <= self._n:
            raise IndexError(f"range [{start}, {stop}) out of bounds for {self._n} tokens")
        if start == stop:
            return np.zeros(0, dtype=self._dtype)
        k = int(np.searchsorted(self._ends, start, side="right"))
        s0 = int(self._starts[k])
        if stop <= self._ends[k]:
            return self.shard(k)[start - s0:stop - s0]
        out = np.empty(stop - start, dtype=self._dtype)
        self._read_into(out, start, stop)
        return out

    def _read_into(self, out: np.ndarray, start: int, stop: int) -> None:
        k = int(np.searchsorted(self._ends, start, side="right"))
        pos = start
        while pos < stop:
            s0, e0 = int(self._starts[k]), int(self._ends[k])
            take = min(stop, e0) - pos
            out[pos - start:pos - start + take] = self.shard(k)[pos - s0:pos - s0 + take]
            pos += take
            k += 1

    def windows(self, starts: np.ndarray | Sequence[int], length: int) -> np.ndarray:
        """Contiguous windows: row ``i`` is ``self[starts[i] : starts[i] + length]``.

        Returns an array of shape ``(len(starts), length)``; a window may span shards.
        """
        starts = np.asarray(starts, dtype=np.int64).reshape(-1)
        if length < 0:
            raise ValueError(f"length must be >= 0, got {length}")
        if starts.size and (starts.min() < 0 or starts.max() + length > self._n):
            raise IndexError(
                f"windows of {length} tokens at starts in [{starts.min()}, {starts.max()}] "
                f"exceed {self._n} tokens"
            )
        if self.num_shards == 1:
            idx = starts[:, None] + np.arange(length, dtype=np.int64)[None, :]
            return np.asarray(self.shard(0)[idx])
        out = np.empty((starts.size, length), dtype=self._dtype)
        for i, s in enumerate(starts.tolist()):
            self._read_into(out[i], s, s + length)
        return out

    def take(self, index: Any) -> np.ndarray:
        """Gather tokens at an integer array of positions (any shape; negatives wrap)."""
        idx = np.asarray(index)
        if idx.dtype == np.bool_:
            if idx.shape != (self._n,):
                raise IndexError(f"boolean index of shape {idx.shape} for {self._n} tokens")
            idx = np.flatnonzero(idx)
        if idx.size == 0:
            return np.zeros(idx.shape, dtype=self._dtype)
        if not np.issubdtype(idx.dtype, np.integer):
            raise IndexError(f"token indices must be integers, got dtype {idx.dtype}")
        flat = idx.astype(np.int64, copy=False).reshape(-1)
        if flat.min() < 0:
            flat = np.where(flat < 0, flat + self._n, flat)
        lo, hi = int(flat.min()), int(flat.max())
        if lo < 0 or hi >= self._n:
            bad = lo if lo < 0 else hi
            raise IndexError(f"index {bad} is out of bounds for {self._n} tokens")
        first, last = (int(np.searchsorted(self._ends, v, side="right")) for v in (lo, hi))
        if first == last:
            return np.asarray(self.shard(first)[flat - self._starts[first]]).reshape(idx.shape)
        sid = np.searchsorted(self._ends, flat, side="right")
        order = np.argsort(sid, kind="stable")
        sorted_sid = sid[order]
        bounds = np.flatnonzero(np.diff(sorted_sid)) + 1
        out = np.empty(flat.size, dtype=self._dtype)
        for group in np.split(order, bounds):
            k = int(sid[group[0]])
            out[group] = self.shard(k)[flat[group] - self._starts[k]]
        return out.reshape(idx.shape)

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, tuple):
            if len(key) != 1:
                raise IndexError(f"a TokenStream is 1-D, got {len(key)} indices")
            key = key[0]
        if isinstance(key, (int, np.integer)):
            i = int(key)
            if i < 0:
                i += self._n
            if not 0 <= i < self._n:
                raise IndexError(f"index {int(key)} is out of bounds for {self._n} tokens")
            k = int(np.searchsorted(self._ends, i, side="right"))
            return self.shard(k)[i - int(self._starts[k])]
        if isinstance(key, slice):
            start, stop, step = key.indices(self._n)
            if step == 1:
                return self.read(start, max(start, stop))
            return self.take(np.arange(start, stop, step, dtype=np.int64))
        if isinstance(key, (np.ndarray, list)):
            return self.take(key)
        raise TypeError(f"unsupported TokenStream index of type {type(key).__name__}")

    def iter_chunks(self, chunk_tokens: int = 1 << 22) -> Iterator[np.ndarray]:
        """Consecutive pieces of at most ``chunk_tokens`` tokens covering the stream in order
        (pieces never span shards)."""
        if chunk_tokens < 1:
            raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
        for k in range(self.num_shards):
            shard = self.shard(k)
            for pos in range(0, shard.shape[0], chunk_tokens):
                yield shard[pos:pos + chunk_tokens]

    def to_numpy(self) -> np.ndarray:
        """The whole stream as one 1-D array: the shard itself (e.g. its memory map) when there
        is a single shard, else an in-memory concatenation."""
        if self.num_shards == 1:
            return self.shard(0)
        out = np.empty(self._n, dtype=self._dtype)
        if self._n:
            self._read_into(out, 0, self._n)
        return out

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        arr = self.to_numpy()
        if dtype is not None and np.dtype(dtype) != arr.dtype:
            return arr.astype(dtype)
        return np.array(arr) if copy else np.asarray(arr)
