"""A fixed pool of cache rows ("slots") that sequences take and give back.

The ModelCache is allocated once, max_batch rows of max_position_embeddings tokens; a row
is emptied (length 0, recurrent state zeroed) when taken and again when freed, so no
sequence ever reads what the row held before."""

from __future__ import annotations

import torch


class SlotPool:
    def __init__(self, model, max_batch: int) -> None:
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch={max_batch!r} must be an int >= 1")
        self.capacity = model.config.max_position_embeddings
        self.cache = model.new_cache(max_batch, self.capacity)
        self.free = list(range(max_batch))

    @property
    def size(self) -> int:
        return self.cache.lengths.shape[0]

    def take(self) -> int | None:
        """An emptied row, or None when every row is in use."""
        if not self.free:
            return None
        row = self.free.pop(0)
        self._reset(row)
        return row

    def release(self, row: int) -> None:
        self._reset(row)
        self.free.append(row)

    def _reset(self, row: int) -> None:
        self.cache.reset_rows(torch.tensor([row], device=self.cache.lengths.device))
