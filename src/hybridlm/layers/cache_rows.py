"""Per-sequence positions of the layer caches: each row of a batch holds its own number of
tokens, `lengths` (B,) long, so sequences of different lengths decode together.

Every cache stores a row's token p in slot p (slot 0 = the row's first token). A call may
feed right-padded tokens: `input_lengths` (B,) says how many of its T tokens are real per row.
The padded tokens are written too (they land in slots past the row's new length, which later
writes overwrite) but the row's length advances by its real tokens only; attention masks
slots by position (`position_mask`), so a real token never sees a padded one.

Glossary: B batch, T new tokens, S key slots.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def zero_lengths(batch: int, device: torch.device) -> torch.Tensor:
    """(B,) long zeros: the lengths of a new, empty cache."""
    return torch.zeros(batch, dtype=torch.long, device=device)


@dataclass(kw_only=True)
class RowLengths:
    """The per-row bookkeeping every layer cache shares (a dataclass base: its fields come
    after the cache's own tensors and are set by keyword). Subclasses name the tensor whose
    first dimension is the batch in `_rows`."""

    lengths: torch.Tensor | None = None  # (B,) long; None: zeros
    input_lengths: torch.Tensor | None = None  # (B,) real tokens per row of the current call

    def _rows(self) -> torch.Tensor:
        raise NotImplementedError

    def __post_init__(self) -> None:
        if self.lengths is None:
            rows = self._rows()
            self.lengths = zero_lengths(rows.shape[0], rows.device)

    @property
    def length(self) -> int:
        """The tokens every row holds (ValueError when rows differ: read `lengths`)."""
        return common_length(self.lengths)

    def reset_rows(self, rows: torch.Tensor) -> None:
        """Empty rows (R,) long: their lengths go to 0, so their old slots are never read
        again (attention masks slots past a row's length; later writes overwrite them).
        Caches with a recurrent state also zero it (see MambaCache)."""
        self.lengths = self.lengths.index_fill(0, rows.to(self.lengths.device), 0)


def common_length(lengths: torch.Tensor) -> int:
    """The one length every row holds; ValueError when the rows differ (read `lengths`)."""
    first = int(lengths[0]) if lengths.numel() else 0
    if lengths.numel() and not bool((lengths == first).all()):
        raise ValueError(f"the cache's rows hold different lengths {lengths.tolist()}: read "
                         "`lengths` (batch,) instead of `length`")
    return first


def advanced(lengths: torch.Tensor, seq: int, input_lengths: torch.Tensor | None
             ) -> torch.Tensor:
    """Lengths after a call of T = seq tokens, of which input_lengths (B,) are real per row."""
    return lengths + (seq if input_lengths is None else input_lengths)


def write_rows(buffer: torch.Tensor, new: torch.Tensor, lengths: torch.Tensor, dim: int,
               what: str) -> int:
    """Write new (T tokens along `dim`) into buffer at each row's own slots lengths[b] ..
    lengths[b] + T - 1; return the number of slots in use after it (max over rows)."""
    seq, capacity = new.shape[dim], buffer.shape[dim]
    end = int(lengths.max()) + seq
    if end > capacity:
        raise ValueError(f"{what} holds {capacity} tokens; {end} requested "
                         f"({end - seq} cached + {seq} new)")
    shape = [1] * new.dim()
    shape[dim] = seq
    steps = torch.arange(seq, device=new.device).view(shape)
    slots = lengths.view([-1] + [1] * (new.dim() - 1)) + steps  # broadcasts to new's shape
    buffer.scatter_(dim, slots.expand_as(new), new.to(buffer.dtype))
    return end


def position_mask(positions: torch.Tensor, num_keys: int) -> torch.Tensor:
    """positions (B, T) of the queries -> (B, 1, T, S) bool, True = attend: the query at
    position p sees slots 0 .. p of its own row (causal per row; the slots after a row's
    length, padding or stale, lie beyond p for every real query)."""
    slots = torch.arange(num_keys, device=positions.device)
    return (slots[None, None, :] <= positions[:, :, None])[:, None]
