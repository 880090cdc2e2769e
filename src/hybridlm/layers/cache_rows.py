"""Per-sequence positions of the layer caches: each row of a batch holds its own number of
tokens, `lengths` (B,) long, so sequences of different lengths decode together.

Every cache stores a row's token p in slot p (slot 0 = the row's first token). A call may
feed right-padded tokens: `input_lengths` (B,) says how many of its T tokens are real per row.
The padded tokens are written too (they land in slots past the row's new length, which later
writes overwrite) but the row's length advances by its real tokens only; attention masks
slots by position (`position_mask`), so a real token never sees a padded one.

A fixed key window (`key_window`, set by a CUDA-graph decode step) makes a call read nothing
on the host: writes skip the capacity check (the caller guarantees room) and attention covers
the first `key_window` slots of every row, a static shape, instead of the slots in use.

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
    key_window: int | None = None  # slots attention covers in a host-sync-free call (above)

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
        Caches with a recurrent state also zero it (see MambaCache). In place: a CUDA graph
        that reads `lengths` keeps reading the same memory."""
        self.lengths.index_fill_(0, rows.to(self.lengths.device), 0)


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
               what: str, key_window: int | None = None) -> int:
    """Write new (T tokens along `dim`) into buffer at each row's own slots lengths[b] ..
    lengths[b] + T - 1; return the number of slots attention should cover: those in use after
    it (max over rows), or key_window when given.

    With key_window nothing is read on the host (no capacity check): slots past the buffer
    are clamped to its last one, which only a row without room (never fed by a correct
    caller: a padded row of a decode step, say) would write."""
    seq, capacity = new.shape[dim], buffer.shape[dim]
    if key_window is None:
        end = int(lengths.max()) + seq
        if end > capacity:
            raise ValueError(f"{what} holds {capacity} tokens; {end} requested "
                             f"({end - seq} cached + {seq} new)")
    shape = [1] * new.dim()
    shape[dim] = seq
    steps = torch.arange(seq, device=new.device).view(shape)
    slots = lengths.view([-1] + [1] * (new.dim() - 1)) + steps  # broadcasts to new's shape
    if key_window is not None:
        slots = slots.clamp(max=capacity - 1)
    buffer.scatter_(dim, slots.expand_as(new), new.to(buffer.dtype))
    return end if key_window is None else key_window


def position_mask(positions: torch.Tensor, num_keys: int) -> torch.Tensor:
    """positions (B, T) of the queries -> (B, 1, T, S) bool, True = attend: the query at
    position p sees slots 0 .. p of its own row (causal per row; the slots after a row's
    length, padding or stale, lie beyond p for every real query)."""
    slots = torch.arange(num_keys, device=positions.device)
    return (slots[None, None, :] <= positions[:, :, None])[:, None]
