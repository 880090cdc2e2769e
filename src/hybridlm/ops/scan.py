"""`selective_scan`: the Mamba-1 scan through the fused Triton kernels where they can run, else
through the chunked pure-torch reference (same signature and result, see selective_scan.py).

The kernel module needs triton, which CPU builds of torch usually lack, so it is imported only
where triton is installed; the choice per call goes through `ops.fast_path_enabled`.
"""

from __future__ import annotations

from torch import Tensor

from hybridlm.ops.dispatch import fast_path_enabled, triton_available
from hybridlm.ops.selective_scan import selective_scan_chunked

if triton_available():
    from hybridlm.ops.selective_scan_triton import KERNEL_DTYPES, selective_scan_fast
else:
    KERNEL_DTYPES, selective_scan_fast = (), None


def selective_scan(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor,
    h0: Tensor | None = None,
    chunk_size: int = 64,
    reset: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """y (Bt, L, Din), h_last (Bt, Din, N) = scan(u, delta, A, B, C, D, h0, reset).

    Shapes as `selective_scan_chunked`. The kernels run for CUDA tensors in fp32 or bf16 (u,
    delta, B, C); other dtypes (fp64 for gradcheck, fp16) take the reference."""
    if (selective_scan_fast is not None and fast_path_enabled(u)
            and all(t.dtype in KERNEL_DTYPES for t in (u, delta, B, C))):
        return selective_scan_fast(u, delta, A, B, C, D, h0, chunk_size, reset)
    return selective_scan_chunked(u, delta, A, B, C, D, h0, chunk_size, reset)
