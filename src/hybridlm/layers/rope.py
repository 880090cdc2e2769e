"""Rotary position embeddings (Su et al. 2021), "rotate half" layout.

Shapes: q/k are (B, heads, T, head_dim); positions are (T,) absolute token positions, so a
decode step at position p rotates exactly as position p did in the full forward. Packed rows
(several examples in one row) give per-row positions (B, T) that restart at 0 at each example
(`segment_positions`).
"""

from __future__ import annotations

import torch
from torch import nn


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, theta: float = 10000.0) -> None:
        super().__init__()
        self.head_dim, self.theta = head_dim, theta
        # Not persistent: derived from config, so checkpoints don't carry it.
        for name, value in self.derived_buffers().items():
            self.register_buffer(name, value, persistent=False)

    def derived_buffers(self, device: torch.device | None = None) -> dict[str, torch.Tensor]:
        """The buffers computed from the config rather than saved: inv_freq (head_dim/2,) fp32.
        A model loaded onto the meta device first (hybridlm.checkpoint) gets them from here."""
        steps = torch.arange(0, self.head_dim, 2, dtype=torch.float32, device=device)
        return {"inv_freq": 1.0 / (self.theta ** (steps / self.head_dim))}

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (T,) or (B, T) -> cos, sin each (T, head_dim) or (B, T, head_dim), fp32."""
        freqs = positions.float()[..., None] * self.inv_freq  # (..., T, head_dim/2)
        emb = torch.cat([freqs, freqs], dim=-1)  # (..., T, head_dim)
        return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, D) or (B, T, D) rotated by cos/sin (T, D) or per row (B, T, D); computed in
    fp32, returned in x.dtype."""
    if cos.dim() == 3 and x.dim() == 4:  # per-row angles: broadcast over the heads
        cos, sin = cos[:, None], sin[:, None]
    x32 = x.float()
    half = x32.shape[-1] // 2
    rotated = torch.cat([-x32[..., half:], x32[..., :half]], dim=-1)
    return (x32 * cos + rotated * sin).to(x.dtype)


def segment_starts(segment_ids: torch.Tensor) -> torch.Tensor:
    """segment_ids (B, T) -> (B, T) bool, True at the first token of each packed example.

    A new example begins wherever the id changes from the previous token (and at t = 0), so
    ids only need to differ between neighbouring examples: [7, 7, 2, 2, 7] is three examples.
    """
    starts = torch.ones_like(segment_ids, dtype=torch.bool)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    return starts


def segment_positions(segment_ids: torch.Tensor) -> torch.Tensor:
    """segment_ids (B, T) -> positions (B, T) long that restart at 0 at each example's first
    token, so each packed example is numbered as if it were alone: [7, 7, 7, 2, 2] ->
    [0, 1, 2, 0, 1]."""
    index = torch.arange(segment_ids.shape[1], device=segment_ids.device).expand_as(segment_ids)
    starts = segment_starts(segment_ids)
    # The latest start at or before t: a running max over the start indices.
    start_index = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=1).values
    return index - start_index
