"""The fused, chunked LM head + cross-entropy equals plain F.linear + F.cross_entropy (loss and
gradients), and never holds the (N, V) logits."""

from __future__ import annotations

import pytest
import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from hybridlm import ops
from hybridlm.ops import linear_cross_entropy, linear_cross_entropy_reference

N, H, V = 37, 16, 53


def inputs(dtype=torch.float32, ignored=slice(3, 12), seed=0):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=generator).to(dtype).requires_grad_()
    weight = (torch.randn(V, H, generator=generator) / H**0.5).to(dtype).requires_grad_()
    targets = torch.randint(0, V, (N,), generator=generator)
    targets[ignored] = -100
    return hidden, weight, targets


def loss_and_grads(fn, hidden, weight, targets, **kwargs):
    loss = fn(hidden, weight, targets, **kwargs)
    grad_h, grad_w = torch.autograd.grad(loss * 1.3, (hidden, weight))  # grad_output != 1
    return loss, grad_h, grad_w


def assert_matches(fused, reference, atol, rtol):
    for got, want in zip(fused, reference, strict=True):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want, atol=atol, rtol=rtol, equal_nan=True)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("chunk_size", [1, 4, 7, N - 1, N, 1000, None])
def test_fp32_loss_and_gradients_equal_the_reference(reduction, chunk_size):
    # chunk 4 leaves rows 4..7 and 8..11 with no target at all (all-ignored chunks);
    # 7 and N-1 do not divide N; 1000 is more than N.
    hidden, weight, targets = inputs()
    fused = loss_and_grads(linear_cross_entropy, hidden, weight, targets,
                           reduction=reduction, chunk_size=chunk_size)
    reference = loss_and_grads(linear_cross_entropy_reference, hidden, weight, targets,
                               reduction=reduction)
    assert_matches(fused, reference, atol=1e-5, rtol=1e-5)


def test_bf16_autocast_matches_the_reference_under_autocast():
    hidden, weight, targets = inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = loss_and_grads(linear_cross_entropy, hidden, weight, targets, chunk_size=8)
        reference = loss_and_grads(linear_cross_entropy_reference, hidden, weight, targets)
    assert fused[0].dtype == torch.float32 and fused[2].dtype == torch.float32
    assert_matches(fused, reference, atol=2e-3, rtol=2e-2)


def test_bf16_parameters_match_the_reference():
    hidden, weight, targets = inputs(torch.bfloat16)
    fused = loss_and_grads(linear_cross_entropy, hidden, weight, targets, chunk_size=5)
    reference = loss_and_grads(linear_cross_entropy_reference, hidden, weight, targets)
    assert fused[1].dtype == torch.bfloat16 and fused[2].dtype == torch.bfloat16
    assert_matches(fused, reference, atol=2e-3, rtol=2e-2)


def test_no_targets_gives_nan_mean_and_zero_sum_with_zero_gradient():
    hidden, weight, targets = inputs(ignored=slice(None))
    mean = linear_cross_entropy(hidden, weight, targets, chunk_size=8)
    assert torch.isnan(mean) and torch.isnan(linear_cross_entropy_reference(hidden, weight,
                                                                            targets))
    loss, grad_h, grad_w = loss_and_grads(linear_cross_entropy, hidden, weight, targets,
                                          reduction="sum", chunk_size=8)
    assert float(loss.detach()) == 0.0 and not grad_h.any() and not grad_w.any()


def test_a_weight_tied_to_the_embedding_gets_both_gradients():
    hidden, weight, targets = inputs()
    ids = torch.randint(0, V, (5,))
    grads = []
    for fn in (linear_cross_entropy, linear_cross_entropy_reference):
        table = weight.detach().clone().requires_grad_()
        embedded = torch.nn.functional.embedding(ids, table).sum(0)  # (H,)
        loss = fn(hidden.detach() + embedded, table, targets)
        loss.backward()
        grads.append(table.grad)
    torch.testing.assert_close(grads[0], grads[1], atol=1e-5, rtol=1e-5)


def test_without_gradients_the_loss_is_the_same():
    hidden, weight, targets = inputs()
    with torch.no_grad():
        loss = linear_cross_entropy(hidden, weight, targets, chunk_size=6)
    assert loss.grad_fn is None
    torch.testing.assert_close(loss, linear_cross_entropy_reference(hidden, weight, targets))


def test_the_reference_switch_takes_the_twin():
    hidden, weight, targets = inputs()
    assert "Fused" in type(linear_cross_entropy(hidden, weight, targets).grad_fn).__name__
    with ops.use_impl("reference"):
        assert "Nll" in type(linear_cross_entropy(hidden, weight, targets).grad_fn).__name__


@pytest.mark.parametrize("kwargs, match", [
    (dict(reduction="none"), "reduction"),
    (dict(chunk_size=0), "chunk_size"),
])
def test_bad_arguments_are_refused_by_name(kwargs, match):
    with pytest.raises(ValueError, match=match):
        linear_cross_entropy(*inputs(), **kwargs)


def test_mismatched_shapes_are_refused():
    hidden, weight, targets = inputs()
    with pytest.raises(ValueError, match="weight"):
        linear_cross_entropy(hidden, weight[:, :-1], targets)
    with pytest.raises(ValueError, match="targets"):
        linear_cross_entropy(hidden, weight, targets[:-1])


class PeakMemory(TorchDispatchMode):
    """The most bytes held at once by the tensors that ops create while it is on (inputs made
    before it do not count). A storage counts from its creation until it is freed."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor) and leaf.device.type != "meta":
                storage = leaf.untyped_storage()
                self.live.setdefault(storage._cdata, (StorageWeakRef(storage), storage.nbytes()))
        self.live = {k: v for k, v in self.live.items() if not v[0].expired()}
        self.peak = max(self.peak, sum(nbytes for _, nbytes in self.live.values()))
        return out


def peak_bytes_of_forward_and_backward(fn, **kwargs) -> int:
    generator = torch.Generator().manual_seed(0)
    rows, vocab = 512, 4096
    hidden = torch.randn(rows, 32, generator=generator, requires_grad=True)
    weight = torch.randn(vocab, 32, generator=generator, requires_grad=True)
    targets = torch.randint(0, vocab, (rows,), generator=generator)
    with PeakMemory() as meter:
        fn(hidden, weight, targets, **kwargs).backward()
    return meter.peak


def test_peak_memory_stays_below_the_full_logits():
    full_logits = 512 * 4096 * 4  # (N, V) fp32: 8 MiB
    # The meter sees the reference hold the full logits (so the check below can fail) ...
    assert peak_bytes_of_forward_and_backward(linear_cross_entropy_reference) >= full_logits
    # ... and the fused op one 64-row chunk of them (1 MiB) plus its (V, H) and (N, H) grads.
    assert peak_bytes_of_forward_and_backward(linear_cross_entropy, chunk_size=64) < (
        full_logits / 2
    )
