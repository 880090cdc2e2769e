"""Whether a forward is the second, recomputing pass of activation checkpointing.

Activation checkpointing (`activation_checkpointing: true` in training) keeps only each
block's inputs and runs the block's forward again during backward. A forward with a side
effect beyond its outputs (a learned-MoE layer adds its expert loads to the count that
balancing reads) must not repeat it then, or the loads would count twice. The trainer enters
`recomputation()` around the second pass; such a layer asks `recomputing()`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

_depth = 0


@contextmanager
def recomputation() -> Iterator[None]:
    """The block within runs a forward a second time, for its backward."""
    global _depth
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1


def recomputing() -> bool:
    return _depth > 0
