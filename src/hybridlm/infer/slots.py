"""A fixed pool of cache rows ("slots") that sequences take and give back.

The ModelCache is allocated once, max_batch rows of max_len tokens (by default
max_position_embeddings, so any request the model takes fits); a row is emptied (length 0,
recurrent state zeroed) when taken and again when freed, so no sequence ever reads what the
row held before.

A forward runs on a span of rows, `view(lo, hi)`: every layer cache's tensors sliced to rows
lo .. hi-1 (views: the forward writes into the pool), then `store(view, lo)` copies back the
lengths it advanced (lengths are replaced, not written in place). Rows are taken lowest
first, so the rows in use stay packed at the front and a span wastes few idle rows."""

from __future__ import annotations

import dataclasses

import torch

from hybridlm.model import ModelCache


class SlotPool:
    """max_batch rows of max_len tokens each (None: max_position_embeddings)."""

    def __init__(self, model, max_batch: int, max_len: int | None = None) -> None:
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch={max_batch!r} must be an int >= 1")
        limit = model.config.max_position_embeddings
        if max_len is not None and (isinstance(max_len, bool) or not isinstance(max_len, int)
                                    or not 1 <= max_len <= limit):
            raise ValueError(f"max_len={max_len!r} must be an int in [1, "
                             f"max_position_embeddings={limit}] or None")
        self.capacity = limit if max_len is None else max_len
        self.cache = model.new_cache(max_batch, self.capacity)
        self.free = list(range(max_batch))

    def take(self) -> int | None:
        """An emptied row, or None when every row is in use."""
        if not self.free:
            return None
        row = min(self.free)
        self.free.remove(row)
        self._reset(row)
        return row

    def release(self, row: int) -> None:
        self._reset(row)
        self.free.append(row)

    def view(self, lo: int, hi: int) -> ModelCache:
        """The cache of rows lo .. hi-1, sharing the pool's memory."""
        layers = [dataclasses.replace(layer, **{
            f.name: getattr(layer, f.name)[lo:hi] for f in dataclasses.fields(layer)
            if isinstance(getattr(layer, f.name), torch.Tensor)}) for layer in self.cache.layers]
        return ModelCache(layers, self.cache.lengths[lo:hi].clone())

    def store(self, view: ModelCache, lo: int) -> None:
        """Copy the lengths a forward advanced in `view` (from `view(lo, ...)`) to the pool."""
        hi = lo + view.lengths.shape[0]
        self.cache.lengths[lo:hi] = view.lengths
        for layer, part in zip(self.cache.layers, view.layers, strict=True):
            layer.lengths[lo:hi] = part.lengths

    def _reset(self, row: int) -> None:
        self.cache.reset_rows(torch.tensor([row], device=self.cache.lengths.device))
