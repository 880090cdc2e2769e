"""The device's two ceilings, measured rather than read off a datasheet: a large bf16
matrix product (TFLOP/s) and a device-to-device copy (GB/s, bytes read + bytes written).
Every compute-bound row is read against the first, every memory-bound row against the
second."""

from __future__ import annotations

import torch

from bench.timing import Measured, Row, attempt, measure, peer_row

NAME = "ceilings"


def matmul_rate(device: torch.device, quick: bool) -> Measured:
    """bf16 (n x n) @ (n x n), n = 8192 (256 quick): 2 n^3 FLOP per product, in TFLOP/s."""
    n = 256 if quick else 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    timing = measure(lambda: a @ b, device, warmup=3, repeats=20, quick=quick)
    return Measured.of(timing, 2 * n**3 / 1e12)


def copy_bandwidth(device: torch.device, quick: bool) -> Measured:
    """Copy 1 GiB (1 MiB quick) from one buffer to another: 2 x its bytes per copy, in GB/s.
    The buffers are far larger than the L2 cache, so no rotation is needed."""
    nbytes = 2**20 if quick else 2**30
    src = torch.randn(nbytes // 2, device=device, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    timing = measure(lambda: dst.copy_(src), device, warmup=3, repeats=20, quick=quick)
    return Measured.of(timing, 2 * nbytes / 1e9)


def run(device: torch.device, quick: bool) -> list[Row]:
    size = "256^3" if quick else "8192^3"
    copied = "1 MiB" if quick else "1 GiB"
    return [
        peer_row(NAME, f"bf16 matmul {size}", "TFLOP/s",
                 attempt("matmul", lambda: matmul_rate(device, quick)), None),
        peer_row(NAME, f"device copy {copied} (read+write)", "GB/s",
                 attempt("copy", lambda: copy_bandwidth(device, quick)), None),
    ]
