"""The one switch between fast kernels and their pure-torch reference twins.

Every op in `hybridlm.ops` that has a fast implementation asks `fast_path_enabled(tensor)`
before taking it; nothing else in the package decides. Tests (and users chasing a numerical
question) force the reference everywhere with

    with ops.use_impl("reference"):
        ...

or for the whole process with `ops.set_impl("reference")` or the environment variable
`HYBRIDLM_OPS=reference`. "auto" (the default) takes a fast path where the device, dtype and
installed libraries support it, and the reference otherwise.

`host_reads_allowed()` says whether code may read a tensor's value on the host right now: not
while a graph is being compiled (the read breaks it) nor while a CUDA graph is being captured
(the read is an illegal synchronisation, and a captured shape would be fixed by one batch's
values). Ops then take their sync-free path, and input checks that read values are skipped.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch

IMPLS = ("auto", "reference")
_ENV = "HYBRIDLM_OPS"


def _checked(name: str, source: str) -> str:
    if name not in IMPLS:
        raise ValueError(f"{source}={name!r} is not an ops implementation; allowed: {IMPLS}")
    return name


_impl = _checked(os.environ.get(_ENV, "auto"), _ENV)


def set_impl(name: str) -> None:
    """Choose the implementation of every op for the whole process: "auto" or "reference"."""
    global _impl
    _impl = _checked(name, "impl")


def current_impl() -> str:
    return _impl


@contextmanager
def use_impl(name: str) -> Iterator[None]:
    """Run the block with the given implementation, then restore the previous one."""
    global _impl
    previous, _impl = _impl, _checked(name, "impl")
    try:
        yield
    finally:
        _impl = previous


def fast_path_enabled(tensor: torch.Tensor) -> bool:
    """True where a CUDA fast path may run for this tensor: not forced to the reference,
    and the tensor lives on a CUDA device. Each op adds its own dtype and library checks."""
    return _impl == "auto" and tensor.is_cuda


def host_reads_allowed() -> bool:
    """False while torch.compile traces or a CUDA graph captures on the current stream: code
    must then neither read a tensor's value on the host nor size a tensor by one."""
    if torch.compiler.is_compiling():
        return False
    return not _stream_capturing()


def _stream_capturing() -> bool:
    # CUDA that was never initialised captures nothing; on CPU builds of torch the capture
    # query itself raises, so it is asked only once CUDA is up.
    return torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing()


def refuse_capture(op: str) -> None:
    """Raise while a CUDA graph captures, for an op about to run its reference twin (which
    reads the expert counts on the host): the error names the op, where the capture would
    otherwise fail deep inside CUDA. A graph being compiled is left alone: there the read
    breaks the graph (refused by fullgraph=True), as it always did."""
    if not torch.compiler.is_compiling() and _stream_capturing():
        raise RuntimeError(
            f"ops.{op}: the reference implementation (ops impl 'reference') reads the expert "
            "counts on the host, which a CUDA graph capture forbids; capture with "
            "ops.use_impl('auto')"
        )


def triton_available() -> bool:
    """Triton is importable (GPU builds of torch ship it; CPU builds usually do not)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
