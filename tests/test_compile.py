"""The whole model compiles with `torch.compile(fullgraph=True)` (attention, MLA, the Mamba
scan, token-routed experts, learned top-k with capacity, expert choice, shared experts, aux
loss), and the compiled model gives the eager loss and gradients. A second test watches every
aten op of a training step for the ones that read values on the host (`.item()`, bincount,
nonzero, boolean-mask indexing): on a GPU each of those waits for the device, and dynamo
traces some of them (with data-dependent sizes) instead of breaking the graph.

Backend "aot_eager": it traces exactly what inductor traces (dynamo + AOTAutograd, forward
and backward graphs) but skips code generation, which on a 2-core CI machine takes ~100 s for
this model against ~10 s for aot_eager (measured 2026-11-25, torch 2.13 CPU).
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from hybridlm import HybridLM, ModelConfig

CASES = {
    # Every mixer, and token-routed, learned top-k (capacity drops slots) and dense MLPs.
    "topk_capacity": dict(mixer_pattern="AML", mlp_pattern="TED",
                          moe_router="topk", moe_top_k=2, moe_capacity_factor=0.75),
    "expert_choice": dict(mixer_pattern="AM", num_hidden_layers=2,
                          mlp_pattern="EE", moe_router="expert_choice",
                          moe_ec_capacity_factor=1.5),
}


def build(case: str) -> HybridLM:
    torch.manual_seed(0)
    base = dict(
        vocab_size=64, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=64, num_experts=4, max_position_embeddings=64,
        num_shared_experts=1, moe_balance="aux_loss", mamba_d_state=4, mamba_chunk_size=8,
        mla_kv_rank=16, mla_rope_dim=8, mla_q_rank=16,
    )
    config = ModelConfig(**{**base, **CASES[case]})
    model = HybridLM(config).train()
    with torch.no_grad():  # wider experts and gates than the init: routing moves the loss
        for name, p in model.named_parameters():
            if ".experts." in name or "router.gate" in name:
                p.normal_(0.0, 0.3)
    return model


def loss_and_grads(run, model: HybridLM, ids: torch.Tensor, **kwargs):
    """One forward + backward of `run` (the model or its compiled wrapper) -> output, grads."""
    model.zero_grad(set_to_none=True)
    out = run(ids, labels=ids, **kwargs)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


@pytest.mark.parametrize("case", list(CASES))
def test_the_model_compiles_fullgraph_and_matches_eager(case):
    model = build(case)
    ids = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(0))
    eager, eager_grads = loss_and_grads(model, model, ids)
    compiled_model = torch.compile(model, fullgraph=True, backend="aot_eager")
    compiled, compiled_grads = loss_and_grads(compiled_model, model, ids)
    torch.testing.assert_close(compiled.loss, eager.loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(compiled.aux["aux_loss"], eager.aux["aux_loss"])
    for got, want in zip(compiled.aux["expert_counts"], eager.aux["expert_counts"], strict=True):
        assert torch.equal(got, want)
    if case == "topk_capacity":
        assert sum(int(d) for d in compiled.aux["dropped_tokens"]) > 0  # capacity did drop
    assert compiled_grads.keys() == eager_grads.keys()
    for name, grad in eager_grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_the_loss_only_forward_compiles_fullgraph_as_the_trainer_calls_it():
    """return_logits=False (the trainer's call): eager takes the fused chunked head, the
    compiled graph the plain head and loss; both give the same loss and gradients."""
    model = build("topk_capacity")
    ids = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(1))
    eager, eager_grads = loss_and_grads(model, model, ids, return_logits=False)
    compiled_model = torch.compile(model, fullgraph=True, backend="aot_eager")
    compiled, compiled_grads = loss_and_grads(compiled_model, model, ids, return_logits=False)
    assert compiled.logits is None
    torch.testing.assert_close(compiled.loss, eager.loss, atol=1e-5, rtol=1e-5)
    for name, grad in eager_grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)


aten = torch.ops.aten
# Ops whose result (a Python number, or an output size) depends on tensor values.
HOST_READS = {aten._local_scalar_dense.default, aten.bincount.default, aten.nonzero.default,
              aten.masked_select.default, aten.repeat_interleave.Tensor,
              aten._unique2.default, aten.unique_consecutive.default}


class HostReadWatch(TorchDispatchMode):
    """Records every aten op of the block that reads tensor values on the host."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        masked = func is aten.index.Tensor and any(
            i is not None and i.dtype == torch.bool for i in args[1])
        if func in HOST_READS or masked:
            self.reads.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("mode", ["compiling", "capturing"])
@pytest.mark.parametrize("case", list(CASES))
def test_a_training_step_reads_no_tensor_value_on_the_host(case, mode, monkeypatch):
    """Eager, as a compiled graph or a CUDA graph capture would run it (`is_compiling()` or
    the capture query true: the sync-free expert path, and no value checks of the input ids),
    the balance step included; `.tolist()` bypasses the dispatcher, so it is trapped on its
    own."""
    model = build(case)
    ids = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(0))
    if mode == "compiling":
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    else:
        monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
        monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: pytest.fail("tolist on the host"))
    with HostReadWatch() as watch:
        model(ids, labels=ids).loss.backward()
        model.balance_step()
    assert watch.reads == []
