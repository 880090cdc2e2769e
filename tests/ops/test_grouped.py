"""Expert ops: the sync-free implementations against their reference twins.

CPU: `sort_by_expert` and the padded grouped SwiGLU against the loop reference, awkward loads
included (empty experts, one slot, a dropped tail), gradients too; a compiled graph traces
them with fullgraph. GPU (marked gpu): the CUDA dispatch (torch._grouped_mm in bf16, the
padded path in fp32) against the reference, per-dtype tolerances.
"""

from __future__ import annotations

import pytest
import torch

from hybridlm import ops
from hybridlm.ops.grouped import grouped_swiglu_padded
from hybridlm.ops.reference import grouped_swiglu_reference, sort_by_expert_reference

H, WIDTH = 16, 24  # hidden, expert width
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

# (loads per expert, tail): tail = slots past the experts (dropped by capacity).
LOADS = [
    ([5, 5, 5, 5], 0),  # balanced
    ([0, 12, 0, 8], 0),  # empty experts
    ([1, 0, 0, 0], 0),  # a single slot
    ([17, 1, 1, 1], 3),  # skewed, with dropped slots behind the last expert
    ([0, 0, 0, 0], 4),  # everything dropped
]


def weights(num_experts: int, seed: int = 0, device: str = "cpu",
            dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shapes = [(num_experts, H, WIDTH), (num_experts, H, WIDTH), (num_experts, WIDTH, H)]
    return [(torch.randn(s, generator=gen) * 0.3).to(device, dtype).requires_grad_()
            for s in shapes]


def grads(out: torch.Tensor, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    if not out.requires_grad:  # nothing routed: the output is a constant zero
        return [torch.zeros_like(t) for t in inputs]
    probe = torch.linspace(-1, 1, out.numel(), device=out.device).reshape(out.shape)
    return torch.autograd.grad((out.float() * probe).sum(), inputs, materialize_grads=True)


def loads_input(loads: list[int], tail: int, device: str = "cpu",
                dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    counts = torch.tensor(loads, device=device)
    x = torch.randn(sum(loads) + tail, H, generator=torch.Generator().manual_seed(1))
    return x.to(device, dtype).requires_grad_(), counts


@pytest.mark.parametrize("loads, tail", LOADS)
@pytest.mark.parametrize("capacity", ["exact", "slots"])
def test_padded_equals_the_loop_reference(loads, tail, capacity):
    x, counts = loads_input(loads, tail)
    ws = weights(len(loads))
    bound = max(max(loads), 1) if capacity == "exact" else x.shape[0]
    y = grouped_swiglu_padded(x, counts, *ws, bound)
    ref = grouped_swiglu_reference(x, counts, *ws)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    assert y[sum(loads):].abs().sum() == 0  # the dropped tail comes back zero
    for got, want in zip(grads(y, [x, *ws]), grads(ref, [x, *ws]), strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_the_reference_tail_is_zero_and_passes_no_gradient():
    x, counts = loads_input([2, 3], 4)
    ws = weights(2)
    y = grouped_swiglu_reference(x, counts, *ws)
    (grad_x,) = torch.autograd.grad(y.sum(), [x])
    assert y[5:].abs().sum() == 0 and grad_x[5:].abs().sum() == 0 and grad_x[:5].abs().sum() > 0


def test_a_padded_capacity_below_a_count_would_lose_slots():
    """Guards the bound: the padded path computes only `capacity` rows per expert."""
    x, counts = loads_input([6, 2], 0)
    ws = weights(2)
    short = grouped_swiglu_padded(x, counts, *ws, 4)
    assert not torch.allclose(short, grouped_swiglu_reference(x, counts, *ws), atol=1e-4)


@pytest.mark.parametrize("shape", [(40,), (13, 3)])
def test_sort_by_expert_equals_the_reference(shape):
    ids = torch.randint(0, 5, shape, generator=torch.Generator().manual_seed(0))
    order, counts = ops.sort_by_expert(ids, 6)  # one bin more than used: stays 0
    ref_order, ref_counts = sort_by_expert_reference(ids, 6)
    assert torch.equal(order, ref_order) and torch.equal(counts, ref_counts)
    assert counts[5] == 0


def test_eager_cpu_dispatch_runs_the_loop_and_reference_is_forced(monkeypatch):
    calls = []
    monkeypatch.setattr(ops.grouped, "grouped_swiglu_padded",
                        lambda *args: calls.append("padded") or grouped_swiglu_padded(*args))
    x, counts = loads_input([3, 4], 1)
    ws = weights(2)
    ops.grouped_swiglu(x, counts, *ws)
    assert calls == []  # eager CPU: the loop, which reads the counts for free
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    ops.grouped_swiglu(x, counts, *ws)
    assert calls == ["padded"]  # a graph being compiled: the sync-free path
    with ops.use_impl("reference"):
        ops.grouped_swiglu(x, counts, *ws)
    assert calls == ["padded"]


def test_a_few_slots_on_the_fast_path_take_the_padded_path(monkeypatch):
    """Decode-sized inputs on CUDA: the padded path (batched matrix-vector products), bounded
    by the slots; the CPU stands in for the device through the dispatcher's switch."""
    calls = []
    monkeypatch.setattr(ops.grouped, "fast_path_enabled", lambda x: True)
    monkeypatch.setattr(ops.grouped, "grouped_swiglu_padded",
                        lambda *args: calls.append(args[-1]) or grouped_swiglu_padded(*args))
    x, counts = loads_input([3, 0, 2], 1)
    ws = weights(3)
    y = ops.grouped_swiglu(x, counts, *ws)
    assert calls == [6]  # every slot, tail included, bounds a count
    torch.testing.assert_close(y, grouped_swiglu_reference(x, counts, *ws))
    ops.grouped_swiglu(x, counts, *ws, capacity=4)
    assert calls == [6, 4]
    with ops.use_impl("reference"):
        ops.grouped_swiglu(x, counts, *ws)
    assert calls == [6, 4]
    assert not ops.grouped._padded_is_cheaper(torch.zeros(65, H), ws[0])  # too many slots
    many = torch.zeros(64, 1024, 2048)  # 64 experts of 1024 x 2048: too many idle weights
    assert not ops.grouped._padded_is_cheaper(torch.zeros(2, 1024), many)
    assert not ops.grouped._padded_is_cheaper(torch.zeros(64, 1024), many)  # 64x the FLOPs
    four = torch.zeros(4, 768, 512)  # complexity-deep-187m's experts
    assert ops.grouped._padded_is_cheaper(torch.zeros(1, 768), four)
    assert ops.grouped._padded_is_cheaper(torch.zeros(64, 768), four)


def test_the_ops_trace_with_fullgraph_and_match_eager():
    ws = weights(4)
    x = torch.randn(18, H, requires_grad=True)
    ids = torch.tensor([3, 0, 3, 1, 4, 3, 0, 0, 1, 3, 4, 3, 0, 3, 3, 1, 0, 3])  # 4: dropped

    def dispatch(x, ids, *ws):
        order, counts = ops.sort_by_expert(ids, 5)
        return ops.grouped_swiglu(x[order], counts[:4], *ws)

    compiled = torch.compile(dispatch, fullgraph=True, backend="aot_eager")
    y = compiled(x, ids, *ws)
    ref = dispatch(x, ids, *ws)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    for got, want in zip(grads(y, [x, *ws]), grads(ref, [x, *ws]), strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


# --- GPU ---------------------------------------------------------------------------------------
TOLERANCE = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}
GPU_LOADS = [([0, 1, 37, 0, 5, 90, 1, 2], 0), ([0, 1, 37, 0, 5, 90, 1, 2], 11),
             ([1, 0, 0, 0, 0, 0, 0, 0], 0), ([16, 16, 16, 16, 16, 16, 16, 16], 0)]


def scaled_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want.float()).abs().max() / want.float().abs().max().clamp_min(1))


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("loads, tail", GPU_LOADS)
def test_cuda_dispatch_equals_the_reference(dtype, loads, tail):
    x, counts = loads_input(loads, tail, "cuda", dtype)
    ws = weights(len(loads), device="cuda", dtype=dtype)
    # Without a tail the caller may promise so, and the grouped GEMMs skip the masking.
    y = ops.grouped_swiglu(x, counts, *ws, covers_all_rows=tail == 0)
    ref = grouped_swiglu_reference(x, counts, *ws)
    assert y.dtype == ref.dtype
    tol = TOLERANCE[dtype]["atol"]
    assert scaled_error(y, ref) < tol
    assert y[sum(loads):].float().abs().sum() == 0
    for got, want in zip(grads(y, [x, *ws]), grads(ref, [x, *ws]), strict=True):
        assert torch.isfinite(got.float()).all()
        assert scaled_error(got, want) < tol


@pytest.mark.gpu
@needs_cuda
def test_cuda_bf16_takes_grouped_mm_without_a_host_sync():
    if torch.cuda.get_device_capability() < (9, 0) or not hasattr(torch, "_grouped_mm"):
        pytest.skip("torch._grouped_mm's kernel needs sm90+")
    x, counts = loads_input([0, 1, 37, 0, 5, 90, 1, 2], 7, "cuda")
    ws = weights(8, device="cuda")
    assert not ops.grouped._grouped_mm_usable(x, ws[0], ws[2])  # fp32 without autocast
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            assert ops.grouped._grouped_mm_usable(x, ws[0], ws[2])
            y = ops.grouped_swiglu(x, counts, *ws)
        y.float().square().sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        ref = grouped_swiglu_reference(x, counts, *ws)
    assert y.dtype == torch.bfloat16 and scaled_error(y, ref) < 3e-2
