"""Selective scan: the chunked op against the step-by-step reference.

Glossary: Bt batch, L length, Din channels, N state size.
"""

import pytest
import torch

from hybridlm.ops.selective_scan import (
    selective_scan_chunked,
    selective_scan_sequential,
    selective_scan_step,
)


def make_inputs(
    batch: int = 2,
    length: int = 10,
    inner: int = 6,
    state: int = 4,
    *,
    seed: int = 0,
    delta_max: float = 1.0,
    a_max: float = 4.0,
    dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """Random scan inputs; delta in (0, delta_max], A in [-a_max, -0.1)."""
    g = torch.Generator().manual_seed(seed)
    inputs = {
        "u": torch.randn(batch, length, inner, generator=g),
        "delta": torch.rand(batch, length, inner, generator=g) * delta_max + 1e-3,
        "A": -(torch.rand(inner, state, generator=g) * (a_max - 0.1) + 0.1),
        "B": torch.randn(batch, length, state, generator=g),
        "C": torch.randn(batch, length, state, generator=g),
        "D": torch.randn(inner, generator=g),
        "h0": torch.randn(batch, inner, state, generator=g),
    }
    return {k: v.to(dtype) for k, v in inputs.items()}


def test_sequential_reference_matches_the_formula_for_two_steps():
    x = make_inputs(length=2)
    u, delta, A, B, C, D, h = x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["h0"]
    ys = []
    for t in range(2):
        dA = torch.exp(delta[:, t, :, None] * A)  # (Bt, Din, N)
        dBu = (delta[:, t] * u[:, t])[..., None] * B[:, t, None, :]  # (Bt, Din, N)
        h = dA * h + dBu
        ys.append((h * C[:, t, None, :]).sum(-1) + D * u[:, t])
    y, h_last = selective_scan_sequential(**x)
    torch.testing.assert_close(y, torch.stack(ys, dim=1))
    torch.testing.assert_close(h_last, h)


@pytest.mark.parametrize("length", [1, 3, 8, 13, 37])
@pytest.mark.parametrize("with_h0", [False, True])
def test_chunked_equals_sequential(length: int, with_h0: bool):
    # chunk 8: L=3 and L=1 are shorter than a chunk, 13 and 37 leave a partial last chunk.
    x = make_inputs(length=length, seed=length)
    if not with_h0:
        x["h0"] = None
    y_ref, h_ref = selective_scan_sequential(**x)
    y, h_last = selective_scan_chunked(**x, chunk_size=8)
    assert y.shape == (2, length, 6) and h_last.shape == (2, 6, 4)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h_last, h_ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("chunk_size", [1, 2, 5, 16, 64])
def test_chunk_size_does_not_change_the_result(chunk_size: int):
    x = make_inputs(length=16, seed=1)
    y_ref, h_ref = selective_scan_sequential(**x)
    y, h_last = selective_scan_chunked(**x, chunk_size=chunk_size)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h_last, h_ref, atol=1e-5, rtol=1e-5)


def _grads(fn, x: dict[str, torch.Tensor], **kwargs) -> dict[str, torch.Tensor]:
    """Gradients of a fixed random functional of (y, h_last) with respect to every input."""
    leaves = {k: v.clone().requires_grad_() for k, v in x.items()}
    y, h_last = fn(**leaves, **kwargs)
    g = torch.Generator().manual_seed(123)
    loss = (y * torch.randn(y.shape, generator=g)).sum()
    loss = loss + (h_last * torch.randn(h_last.shape, generator=g)).sum()
    loss.backward()
    return {k: v.grad for k, v in leaves.items()}


def test_chunked_gradients_equal_sequential_gradients():
    x = make_inputs(length=19, seed=2)
    ref = _grads(selective_scan_sequential, x)
    got = _grads(selective_scan_chunked, x, chunk_size=4)
    for name in ("u", "delta", "A", "B", "C", "D", "h0"):
        torch.testing.assert_close(got[name], ref[name], atol=1e-4, rtol=1e-4, msg=name)


def test_chunked_passes_gradcheck_in_float64():
    x = make_inputs(batch=1, length=7, inner=3, state=2, seed=3, dtype=torch.float64)
    names = list(x)
    leaves = tuple(x[k].requires_grad_() for k in names)

    def fn(*args: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return selective_scan_chunked(**dict(zip(names, args, strict=True)), chunk_size=3)

    assert torch.autograd.gradcheck(fn, leaves)


def test_stable_for_large_steps_and_decay_rates():
    # delta * |A| up to 320: exp(-320) underflows to 0 in fp32, and any exp(+cumsum) trick
    # would overflow; the scan only ever multiplies decays in (0, 1].
    x = make_inputs(length=40, seed=4, delta_max=20.0, a_max=16.0)
    ref = _grads(selective_scan_sequential, x)
    got = _grads(selective_scan_chunked, x, chunk_size=16)
    y, h_last = selective_scan_chunked(**x, chunk_size=16)
    y_ref, h_ref = selective_scan_sequential(**x)
    assert torch.isfinite(y).all() and torch.isfinite(h_last).all()
    torch.testing.assert_close(y, y_ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(h_last, h_ref, atol=1e-4, rtol=1e-4)
    for name, grad in got.items():
        assert torch.isfinite(grad).all(), name
        torch.testing.assert_close(grad, ref[name], atol=1e-3, rtol=1e-3, msg=name)


def test_bf16_input_gives_bf16_output_computed_in_fp32():
    x = make_inputs(length=12, seed=5, dtype=torch.bfloat16)
    y, h_last = selective_scan_chunked(**x, chunk_size=4)
    assert y.dtype == torch.bfloat16
    assert h_last.dtype == torch.float32  # the state is kept in fp32
    y_ref, h_ref = selective_scan_sequential(**{k: v.float() for k, v in x.items()})
    torch.testing.assert_close(y.float(), y_ref, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(h_last, h_ref, atol=1e-5, rtol=1e-5)


def test_backward_keeps_no_per_step_states():
    # Only (Bt, L, Din)-sized inputs and one state per chunk are saved, never (Bt, L, Din, N).
    batch, length, inner, state = 2, 64, 8, 8
    x = {k: v.requires_grad_() for k, v in make_inputs(batch, length, inner, state).items()}
    saved: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y, _ = selective_scan_chunked(**x, chunk_size=16)
    all_states = batch * length * inner * state
    assert max(saved) < all_states and sum(saved) < all_states
    y.sum().backward()  # and backward still works from what was saved


def test_step_matches_one_step_of_the_scan():
    x = make_inputs(length=1, seed=6)
    y, h = selective_scan_step(
        x["h0"], x["u"][:, 0], x["delta"][:, 0], x["A"], x["B"][:, 0], x["C"][:, 0], x["D"]
    )
    y_ref, h_ref = selective_scan_chunked(**x)
    torch.testing.assert_close(y, y_ref[:, 0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h, h_ref, atol=1e-5, rtol=1e-5)


def test_rejects_empty_sequence_and_bad_chunk_size():
    x = make_inputs(length=4)
    with pytest.raises(ValueError, match="chunk_size"):
        selective_scan_chunked(**x, chunk_size=0)
    x = make_inputs(length=0)
    with pytest.raises(ValueError, match="L >= 1"):
        selective_scan_chunked(**x)


def test_chunked_scan_compiles_fullgraph_with_the_eager_values_and_gradients():
    """The autograd.Function (forward, and the hand-written backward) traces without a graph
    break, so a compiled Mamba block is one graph; resets and a partial last chunk included."""
    x = {k: v.requires_grad_() for k, v in make_inputs(length=13, seed=3).items()}
    reset = torch.zeros(2, 13, dtype=torch.bool)
    reset[0, 5] = reset[1, 9] = True

    def scan(inputs):
        y, h = selective_scan_chunked(**inputs, chunk_size=4, reset=reset)
        return y, h

    compiled = torch.compile(scan, fullgraph=True, backend="aot_eager")
    outs, ref = compiled(x), scan(x)
    probes = [torch.linspace(-1, 1, t.numel()).reshape(t.shape) for t in ref]
    inputs = list(x.values())

    def grads(results):
        probed = sum((o * p).sum() for o, p in zip(results, probes, strict=True))
        return torch.autograd.grad(probed, inputs)

    compiled_grads, ref_grads = grads(outs), grads(ref)
    for got, want in zip((*outs, *compiled_grads), (*ref, *ref_grads), strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
