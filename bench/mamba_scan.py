"""Mamba-1 mixer and selective scan on one GPU: the fused Triton scan against the reference.

Forward + backward of the `Mamba` layer (d_model 768, N 16, Din 1536, bf16 autocast, fp32
input that requires grad) and of the scan alone, each timed with CUDA events (median over
iterations, after warm-up) in one process: first with `ops.use_impl("reference")` (the chunked
pure-torch scan), then with the default dispatch (the Triton kernels). Before timing, the fast
paths are checked against the reference on the same inputs (relative error by norm).

    python -m bench.mamba_scan --out mamba_scan.json          # on a CUDA machine

Prints a table and writes every number to --out as JSON. `run()` returns the same dict.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))

from bench.timing import cuda_median_ms  # noqa: E402
from hybridlm import ops  # noqa: E402
from hybridlm.config import ModelConfig  # noqa: E402
from hybridlm.layers.mamba import Mamba  # noqa: E402

HIDDEN, STATE = 768, 16
SHAPES = ((8, 2048), (2, 8192))  # (batch, length): 16,384 tokens each


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def make_layer(seed: int = 0) -> Mamba:
    torch.manual_seed(seed)
    config = ModelConfig(vocab_size=256, hidden_size=HIDDEN, num_hidden_layers=1,
                         num_attention_heads=12, num_key_value_heads=12,
                         intermediate_size=4 * HIDDEN, mixer_pattern="M", mamba_d_state=STATE)
    return Mamba(config, 0).cuda()


def layer_step(layer: Mamba, x: torch.Tensor) -> Callable[[], list[torch.Tensor]]:
    """One forward + backward of the mixer; returns the output and the gradients."""
    def step() -> list[torch.Tensor]:
        layer.zero_grad(set_to_none=True)
        x.grad = None
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = layer(x, positions=None)
        out.backward(torch.ones_like(out) / out.numel() ** 0.5)
        return [out.detach(), x.grad] + [p.grad for p in layer.parameters()]
    return step


def scan_inputs(batch: int, length: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Scan inputs shaped and typed as the layer passes them (bf16 u, B, C; fp32 delta, A)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    inner = 2 * HIDDEN
    proj = torch.randn(batch, length, 48 + 2 * STATE, device="cuda", generator=g)
    leaves = {
        "u": torch.randn(batch, length, inner, device="cuda", generator=g).bfloat16(),
        "delta": torch.rand(batch, length, inner, device="cuda", generator=g) * 0.1 + 1e-3,
        "A": -torch.arange(1, STATE + 1, device="cuda").float().expand(inner, -1).contiguous(),
        "proj": proj.bfloat16(),
        "D": torch.ones(inner, device="cuda"),
    }
    return {k: v.requires_grad_() for k, v in leaves.items()}


def scan_step(x: dict[str, torch.Tensor], backward: bool) -> Callable[[], list[torch.Tensor]]:
    def step() -> list[torch.Tensor]:
        for v in x.values():
            v.grad = None
        b, c = x["proj"][..., 48:48 + STATE], x["proj"][..., 48 + STATE:]
        y, h_last = ops.selective_scan(x["u"], x["delta"], x["A"], b, c, x["D"])
        if not backward:
            return [y, h_last]
        y.backward(torch.ones_like(y))
        return [y.detach()] + [v.grad for v in x.values()]
    return step


def compare(fast: list[torch.Tensor], ref: list[torch.Tensor]) -> float:
    """Worst relative error over the paired tensors."""
    return max(rel_error(f, r) for f, r in zip(fast, ref, strict=True))


def measure_shape(batch: int, length: int, iters: int, ref_iters: int) -> dict:
    tokens = batch * length
    row: dict = {"batch": batch, "length": length, "tokens": tokens}
    x = torch.randn(batch, length, HIDDEN, device="cuda", requires_grad=True)
    layer = make_layer()
    step = layer_step(layer, x)
    scan_x = scan_inputs(batch, length)
    fwd, fwd_bwd = scan_step(scan_x, backward=False), scan_step(scan_x, backward=True)
    with ops.use_impl("reference"):
        ref_layer = [t.clone() for t in step()]
        ref_scan = [t.clone() for t in fwd_bwd()]
        row["ref_mixer_ms"] = cuda_median_ms(step, ref_iters, warmup=1)
        row["ref_scan_fwd_bwd_ms"] = cuda_median_ms(fwd_bwd, ref_iters, warmup=1)
    row["mixer_max_rel_error"] = compare(step(), ref_layer)
    row["scan_max_rel_error"] = compare(fwd_bwd(), ref_scan)
    row["mixer_ms"] = cuda_median_ms(step, iters, warmup=2)
    # the same again: the run-to-run spread
    row["mixer_repeat_ms"] = cuda_median_ms(step, iters, warmup=2)
    row["scan_fwd_ms"] = cuda_median_ms(fwd, iters, warmup=2)
    row["scan_fwd_bwd_ms"] = cuda_median_ms(fwd_bwd, iters, warmup=2)
    for key in ("mixer", "ref_mixer"):
        row[f"{key}_tokens_per_s"] = tokens / (row[f"{key}_ms"] / 1e3)
    return row


def copy_bandwidth_gbs() -> float:
    """Device-to-device copy, bytes read plus written per second: the memory ceiling."""
    src = torch.randn(256 * 2**20 // 4, device="cuda")
    dst = torch.empty_like(src)
    ms = cuda_median_ms(lambda: dst.copy_(src), 20, warmup=2)
    return 2 * src.numel() * 4 / (ms / 1e3) / 1e9


def run(shapes: tuple[tuple[int, int], ...] = SHAPES, iters: int = 20,
        ref_iters: int = 3) -> dict:
    torch.backends.cuda.matmul.allow_tf32 = True
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "copy_gbs": copy_bandwidth_gbs(), "rows": []}
    try:
        import triton

        from hybridlm.ops import selective_scan_triton as kernels
        result["triton"] = triton.__version__
        result["kernel_tiles"] = {"fwd_time_tile": kernels.FWD_TIME_TILE,
                                  "bwd_time_tile": kernels.BWD_TIME_TILE,
                                  "pairs_per_program": kernels.PAIRS_PER_PROGRAM,
                                  "bwd_max_registers": kernels.BWD_MAX_REGISTERS}
    except ImportError:
        result["triton"] = None
    for batch, length in shapes:
        result["rows"].append(measure_shape(batch, length, iters, ref_iters))
    return result


def table(result: dict) -> str:
    head = (f"{'shape':>10} {'ref mixer tok/s':>16} {'mixer tok/s':>12} {'mixer ms':>9} "
            f"{'(repeat)':>9} {'scan fwd':>9} {'scan f+b':>9} {'ref scan f+b':>13} "
            f"{'err mixer':>10} {'err scan':>9}")
    lines = [f"{result['device']}, torch {result['torch']}, triton {result['triton']}, "
             f"copy {result['copy_gbs']:.0f} GB/s", head]
    for r in result["rows"]:
        lines.append(
            f"{r['batch']:>3}x{r['length']:<6} {r['ref_mixer_tokens_per_s']:>16,.0f} "
            f"{r['mixer_tokens_per_s']:>12,.0f} {r['mixer_ms']:>9.2f} "
            f"{r['mixer_repeat_ms']:>9.2f} {r['scan_fwd_ms']:>9.3f} {r['scan_fwd_bwd_ms']:>9.3f} "
            f"{r['ref_scan_fwd_bwd_ms']:>13.1f} {r['mixer_max_rel_error']:>10.1e} "
            f"{r['scan_max_rel_error']:>9.1e}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="write the numbers here as JSON")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--ref-iters", type=int, default=3)
    args = parser.parse_args(argv)
    result = run(iters=args.iters, ref_iters=args.ref_iters)
    print(table(result))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
