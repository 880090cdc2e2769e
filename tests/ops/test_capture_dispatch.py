"""CUDA graph capture, on the CPU CI: `host_reads_allowed()` and the choices it drives, with
the capture query monkeypatched. While a CUDA graph captures, the expert dispatch must take its
sync-free path, the forced reference is refused by name, and the model skips the input checks
that read values. The real capture runs in tests/layers/test_block_cuda_graphs.py (gpu)."""

from __future__ import annotations

import pytest
import torch

from hybridlm import ops
from hybridlm.ops.grouped import grouped_swiglu_padded
from hybridlm.ops.reference import grouped_swiglu_reference


@pytest.fixture
def capturing(monkeypatch):
    """Pretend the current CUDA stream is capturing a graph."""
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)


def expert_inputs() -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(9, 8, generator=gen)  # 9 slots, 2 of them dropped (past sum(counts))
    counts = torch.tensor([4, 0, 3])
    ws = [torch.randn(s, generator=gen) * 0.3 for s in [(3, 8, 16), (3, 8, 16), (3, 16, 8)]]
    return x, counts, *ws


def test_host_reads_are_allowed_in_eager_cpu_work():
    assert ops.host_reads_allowed()  # CPU build: CUDA never initialised, nothing captures


def test_host_reads_are_refused_in_a_graph_being_compiled():
    @torch.compile(fullgraph=True, backend="eager")
    def allowed(x):
        return x + 1 if ops.host_reads_allowed() else x - 1

    assert allowed(torch.zeros(1)).item() == -1


def test_host_reads_are_refused_while_a_cuda_graph_captures(capturing):
    assert not ops.host_reads_allowed()


def test_the_expert_dispatch_takes_the_padded_path_while_capturing(monkeypatch, capturing):
    calls = []
    monkeypatch.setattr(ops.grouped, "grouped_swiglu_padded",
                        lambda *args: calls.append(args[-1]) or grouped_swiglu_padded(*args))
    x, counts, *ws = expert_inputs()
    y = ops.grouped_swiglu(x, counts, *ws, capacity=5)
    assert calls == [5]  # sync-free, with the router's static bound as its capacity
    torch.testing.assert_close(y, grouped_swiglu_reference(x, counts, *ws))


@pytest.mark.parametrize("op", ["sort_by_expert", "grouped_swiglu"])
def test_the_forced_reference_is_refused_by_name_while_capturing(op, capturing):
    x, counts, *ws = expert_inputs()
    args = (torch.tensor([0, 2, 2, 1]), 3) if op == "sort_by_expert" else (x, counts, *ws)
    with ops.use_impl("reference"), pytest.raises(RuntimeError, match=f"ops.{op}: .*capture"):
        getattr(ops, op)(*args)


def test_the_model_checks_skip_value_reads_while_capturing(monkeypatch, make_model):
    model = make_model(max_position_embeddings=16)
    bad_ids = torch.tensor([[0, 500]])  # 500 >= vocab_size 97
    cache = model.new_cache(1, 8)
    cache.lengths = torch.tensor([15])  # 15 cached + 2 new tokens > 16 positions
    too_long = torch.tensor([3])  # input_lengths past the 2 new tokens
    checks = [
        (lambda: model._check_input_ids(bad_ids), "outside"),
        (lambda: model._check_input_lengths(too_long, bad_ids, cache), "outside"),
        (lambda: model._check_inputs(torch.tensor([[0, 1]]), cache, None, None), "exceeds"),
    ]
    for check, message in checks:  # eager: every value is checked
        with pytest.raises(ValueError, match=message):
            check()
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    for check, _ in checks:  # capturing: shapes and dtypes only
        check()
    with pytest.raises(ValueError, match="shape"):  # ... which are still checked
        model._check_input_ids(torch.zeros(3, dtype=torch.long))
