"""Activation checkpointing: keep each block's inputs only and recompute its activations
during backward (`activation_checkpointing: true`), trading about one more forward for
memory that no longer grows with depth x length x width of every intermediate.

Applied in place (each block's `forward` is wrapped on the instance), so parameter names, and
with them checkpoints and model directories, do not change. The second pass runs inside
`layers.recompute.recomputation()`, so side effects of a forward (MoE load counts) happen once.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any

from torch import nn
from torch.utils.checkpoint import checkpoint

from hybridlm.layers.recompute import recomputation


def _contexts() -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
    return contextlib.nullcontext(), recomputation()  # (first pass, recomputing pass)


def _checkpointed(forward: Any, *args: Any, **kwargs: Any) -> Any:
    return checkpoint(forward, *args, use_reentrant=False, context_fn=_contexts, **kwargs)


def checkpoint_blocks(blocks: nn.ModuleList) -> None:
    """Recompute each block's forward during backward instead of keeping its activations."""
    for block in blocks:
        if not isinstance(block.forward, functools.partial):  # applied once
            block.forward = functools.partial(_checkpointed, block.forward)
