"""Hot ops, called by the layers through this module only.

Each op's pure-torch implementation lives here (`reference.py`, `selective_scan.py`,
`linear_cross_entropy.py`). A fast kernel for an op is registered here next to its reference
twin (`grouped.py` beside `reference.py`), so the choice of implementation stays in one place
and layers never import triton or CUDA code directly.
"""

from __future__ import annotations

from hybridlm.ops.attention import attention
from hybridlm.ops.dispatch import (
    current_impl,
    fast_path_enabled,
    host_reads_allowed,
    set_impl,
    use_impl,
)
from hybridlm.ops.grouped import grouped_swiglu, sort_by_expert
from hybridlm.ops.linear_cross_entropy import (
    linear_cross_entropy,
    linear_cross_entropy_reference,
)
from hybridlm.ops.scan import selective_scan
from hybridlm.ops.selective_scan import (
    selective_scan_chunked,
    selective_scan_sequential,
    selective_scan_step,
)

__all__ = [
    "attention",
    "current_impl",
    "fast_path_enabled",
    "grouped_swiglu",
    "host_reads_allowed",
    "linear_cross_entropy",
    "linear_cross_entropy_reference",
    "selective_scan",
    "selective_scan_chunked",
    "selective_scan_sequential",
    "selective_scan_step",
    "set_impl",
    "sort_by_expert",
    "use_impl",
]
