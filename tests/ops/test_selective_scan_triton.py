"""The fused Triton selective scan against the pure-torch scans, forward and every gradient.

GPU tests (they need CUDA and triton); on a CPU machine they skip, and only the dispatch test
runs. The reference is `selective_scan_chunked` in float64 on the same (already rounded)
inputs, itself checked against the step-by-step scan in test_selective_scan.py; errors are
relative by norm, ||out - ref|| / ||ref||.

Glossary: Bt batch, L length, Din channels, N state size.
"""

from __future__ import annotations

import pytest
import torch

from hybridlm import ops
from hybridlm.ops.dispatch import triton_available
from hybridlm.ops.selective_scan import selective_scan_chunked, selective_scan_sequential

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available() or not triton_available(),
                               reason="needs CUDA and triton")
# fp32: fp32 arithmetic throughout (exp2 is the hardware approximation, ~1e-7 relative).
# bf16: inputs are the same rounded values for both sides; outputs and gradients are stored
# in bf16 (2^-9 relative rounding per element).
TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 1e-2}
INPUTS = ("u", "delta", "A", "B", "C", "D", "h0")


def make_inputs(batch: int, length: int, inner: int, state: int, dtype: torch.dtype, *,
                h0: bool, reset: bool, seed: int, device: str = "cuda") -> dict:
    """Random scan inputs as the Mamba layer passes them: u, B, C in `dtype` (u a (Bt, L, Din)
    view of a (Bt, Din, L) tensor, B and C strided views of one projection, as after
    x_proj(...).split), delta and A, D, h0 in fp32."""
    g = torch.Generator().manual_seed(seed)
    proj = torch.randn(batch, length, 2 * state + 3, generator=g)
    x = {
        "u": torch.randn(batch, inner, length, generator=g).to(dtype).transpose(1, 2),
        "delta": torch.rand(batch, length, inner, generator=g) * 0.5 + 1e-3,
        "A": -(torch.rand(inner, state, generator=g) * 4 + 0.1),
        "B": proj[..., 3:3 + state].to(dtype),
        "C": proj[..., 3 + state:].to(dtype),
        "D": torch.randn(inner, generator=g),
        "h0": torch.randn(batch, inner, state, generator=g) if h0 else None,
        "reset": torch.rand(batch, length, generator=g) < 0.05 if reset else None,
    }
    return {k: v.to(device) if v is not None else None for k, v in x.items()}


def run_with_grads(fn, x: dict, weights: tuple[torch.Tensor, torch.Tensor]) -> dict:
    """y, h_last and the gradients of sum(y * w_y) + sum(h_last * w_h) for every input."""
    leaves = {k: v.detach().clone().requires_grad_(k in INPUTS) if v is not None else None
              for k, v in x.items()}
    y, h_last = fn(**leaves)
    ((y.double() * weights[0]).sum() + (h_last.double() * weights[1]).sum()).backward()
    out = {"y": y.detach(), "h_last": h_last.detach()}
    out.update({f"grad_{k}": leaves[k].grad for k in INPUTS if leaves[k] is not None})
    return out


def reference(x: dict, weights: tuple[torch.Tensor, torch.Tensor]) -> dict:
    upcast = {k: v.double() if v is not None and v.is_floating_point() else v
              for k, v in x.items()}
    return run_with_grads(selective_scan_chunked, upcast, weights)


def poison_free_memory() -> None:
    """Fill the allocator's free blocks with NaN, so an output element the kernel never writes
    shows up as NaN in the comparison instead of a stale plausible value."""
    torch.cuda.synchronize()
    torch.empty(256 * 2**20, device="cuda", dtype=torch.uint8).fill_(0xFF)  # NaN bytes


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref||; the absolute error where ref is exactly zero (dL/dA at L = 1
    with no h0: every h_{t-1} is zero)."""
    scale = ref.norm().item() or 1.0
    return (out.double() - ref).norm().item() / scale


def check_parity(x: dict, dtype: torch.dtype) -> None:
    from hybridlm.ops.selective_scan_triton import selective_scan_fast

    batch, length, inner = x["u"].shape
    g = torch.Generator(device="cuda").manual_seed(length)
    weights = (torch.randn(batch, length, inner, generator=g, device="cuda", dtype=torch.float64),
               torch.randn(batch, inner, x["A"].shape[1], generator=g, device="cuda",
                           dtype=torch.float64))
    expected = reference(x, weights)
    poison_free_memory()
    got = run_with_grads(selective_scan_fast, x, weights)
    assert got.keys() == expected.keys()
    for name, ref in expected.items():
        if name.startswith("grad_"):
            assert got[name].dtype == x[name.removeprefix("grad_")].dtype, name
        assert torch.isfinite(got[name]).all(), f"{name} has NaN/inf (unwritten elements?)"
        err = rel_error(got[name], ref)
        assert err < TOLERANCE[dtype], f"{name}: relative error {err:.2e}"


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("with_h0", [False, True], ids=["zero_h0", "h0"])
@pytest.mark.parametrize("length", [1, 7, 63, 64, 65, 1000, 2048 + 17])
def test_forward_and_gradients_match_the_reference(length, with_h0, dtype):
    # 16 steps per kernel tile: 1 and 7 fit in one partial tile, 63/64/65 straddle a tile
    # edge, 2065 spans 130 tiles with a partial last one.
    check_parity(make_inputs(2, length, 24, 16, dtype, h0=with_h0, reset=False, seed=length),
                 dtype)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("length", [65, 1000])
def test_reset_rows_match_the_reference(length, dtype):
    check_parity(make_inputs(3, length, 24, 16, dtype, h0=True, reset=True, seed=length), dtype)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("state", [4, 12, 64])
@pytest.mark.parametrize("inner", [37, 100])
def test_other_state_sizes_and_ragged_channel_blocks(state, inner):
    # 12 is not a power of two (the kernel pads N); 37 and 100 leave a partial channel block.
    x = make_inputs(2, 130, inner, state, torch.float32, h0=True, reset=True, seed=state)
    check_parity(x, torch.float32)


@pytest.mark.gpu
@needs_gpu
def test_agrees_with_the_step_by_step_scan():
    from hybridlm.ops.selective_scan_triton import selective_scan_fast

    x = make_inputs(2, 50, 16, 8, torch.float32, h0=True, reset=True, seed=3)
    y, h_last = selective_scan_fast(**x)
    y_ref, h_ref = selective_scan_sequential(**{k: v.double() if v is not None and
                                                 v.is_floating_point() else v
                                                 for k, v in x.items()})
    assert rel_error(y, y_ref) < 2e-5 and rel_error(h_last, h_ref) < 2e-5


@pytest.mark.gpu
@needs_gpu
def test_compiles_with_fullgraph_forward_and_backward():
    x = make_inputs(2, 40, 16, 16, torch.bfloat16, h0=True, reset=True, seed=5)
    leaves = {k: v.requires_grad_(k in INPUTS) if v is not None else None for k, v in x.items()}

    def loss_fn(inputs: dict) -> torch.Tensor:
        y, h_last = ops.selective_scan(**inputs)
        return y.float().square().sum() + h_last.sum()

    eager = loss_fn(leaves)
    eager_grads = torch.autograd.grad(eager, [leaves[k] for k in INPUTS])
    compiled = torch.compile(loss_fn, fullgraph=True)(leaves)
    compiled_grads = torch.autograd.grad(compiled, [leaves[k] for k in INPUTS])
    torch.testing.assert_close(compiled, eager)
    for got, want in zip(compiled_grads, eager_grads, strict=True):
        torch.testing.assert_close(got, want)


@pytest.mark.gpu
@needs_gpu
def test_mamba_layer_matches_its_reference_path_under_bf16_autocast():
    from hybridlm.config import ModelConfig
    from hybridlm.layers.mamba import Mamba

    torch.manual_seed(0)
    config = ModelConfig(vocab_size=97, hidden_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, intermediate_size=128,
                         mixer_pattern="M")
    layer = Mamba(config, 0).cuda()
    x = torch.randn(2, 300, 64, device="cuda")
    segments = torch.arange(300, device="cuda").div(70, rounding_mode="floor").expand(2, -1)

    def run() -> list[torch.Tensor]:
        layer.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = layer(x, positions=None, segment_ids=segments)
        out.float().square().mean().backward()
        return [out.detach().float()] + [p.grad for p in layer.parameters()]

    fast = run()
    with ops.use_impl("reference"):
        slow = run()
    for got, want in zip(fast, slow, strict=True):
        assert rel_error(got, want.double()) < 2e-2


@pytest.mark.gpu
@needs_gpu
def test_bad_inputs_name_the_field():
    from hybridlm.ops.selective_scan_triton import selective_scan_fast

    x = make_inputs(1, 4, 8, 4, torch.float32, h0=False, reset=False, seed=0)
    with pytest.raises(ValueError, match="chunk_size=0"):
        selective_scan_fast(**x, chunk_size=0)
    with pytest.raises(ValueError, match=r"u\.dtype=torch\.float64"):
        selective_scan_fast(**{**x, "u": x["u"].double()})


def test_dispatch_takes_the_reference_on_cpu_and_when_forced():
    x = make_inputs(2, 9, 6, 4, torch.float32, h0=True, reset=True, seed=1, device="cpu")
    y_ref, h_ref = selective_scan_chunked(**x)
    y, h_last = ops.selective_scan(**x)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    torch.testing.assert_close(h_last, h_ref, rtol=0, atol=0)
    with ops.use_impl("reference"):
        y, h_last = ops.selective_scan(**x)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
