"""The engine's static decode step (infer/decode_graphs.py): a fixed key window and fixed row
buckets give the tokens of the eager engine, read no tensor value on the host (so the step
can be captured), leave the rows it does not feed untouched, and, on a GPU, replay as CUDA
graphs with the same tokens."""

import pytest
import torch
from test_engine import MAX_TOKENS, STACKS, prompts, staggered

from hybridlm.infer.decode_graphs import DecodeGraphs, buckets
from hybridlm.infer.engine import Engine
from hybridlm.infer.sampling_params import SamplingParams
from test_compile import HostReadWatch

STATIC_STACKS = {**STACKS, "mla_plain": dict(mixer_pattern="L", mla_absorb=False)}


def requests():
    return [(p, SamplingParams(max_tokens=n, temperature=0))
            for p, n in zip(prompts(), MAX_TOKENS, strict=True)]


def static_engine(model, capture: bool) -> Engine:
    engine = Engine(model, max_batch=3, prefill_chunk=4, cuda_graphs=False)
    engine.graphs = DecodeGraphs(model, engine.pool, capture=capture)
    return engine


def test_buckets_double_up_to_the_limit():
    assert buckets(1) == [1]
    assert buckets(8) == [1, 2, 4, 8]
    assert buckets(12) == [1, 2, 4, 8, 12]
    assert buckets(200, smallest=64) == [64, 128, 200]


@pytest.mark.parametrize("stack", STATIC_STACKS.values(), ids=STATIC_STACKS.keys())
def test_the_static_decode_step_gives_the_eager_engines_tokens(make_history_model, stack):
    model = make_history_model(**stack)
    eager = staggered(Engine(model, max_batch=3, prefill_chunk=4), requests())
    engine = static_engine(model, capture=False)
    static = staggered(engine, requests())
    assert [o.token_ids for o in static] == [o.token_ids for o in eager]
    assert all(len(set(o.token_ids)) >= 4 for o in static)  # varied: the test can fail
    assert engine.pool.cache.lengths.tolist() == [0, 0, 0]


def test_a_window_too_small_for_the_history_changes_the_tokens(make_history_model, monkeypatch):
    """The window decides what attention reads: one slot short of the rows' lengths loses
    the history (so the equality above depends on the window being right)."""
    model = make_history_model(**STACKS["gqa"])
    engine = static_engine(model, capture=False)
    decode = engine.graphs.decode
    engine.graphs.window_buckets = list(range(1, 1 + engine.pool.capacity))  # every width
    monkeypatch.setattr(engine.graphs, "decode", lambda tokens, window: decode(tokens, window - 1))
    wrong = staggered(engine, requests())
    eager = staggered(Engine(model, max_batch=3, prefill_chunk=4), requests())
    assert [o.token_ids for o in wrong] != [o.token_ids for o in eager]


@pytest.mark.parametrize("stack", [STACKS["mixed"], STACKS["mamba"]], ids=["mixed", "mamba"])
def test_rows_the_step_does_not_feed_keep_their_state(make_history_model, stack):
    """A step feeds only its rows: a request mid-way (row 0) gets the same tokens whether
    or not steps for other rows (1 and 2) ran in between."""
    model = make_history_model(**stack)
    prompt = prompts(seed=1, lengths=(4,))[0]  # a varied continuation in both stacks

    def tokens(foreign_steps: int) -> list[int]:
        engine = static_engine(model, capture=False)
        request = engine.add_request(prompt, SamplingParams(max_tokens=8, temperature=0))
        engine.step()  # row 0: its prompt (one chunk) in the cache, first token sampled
        for step in range(foreign_steps):
            engine.graphs.decode({1: 7 + step, 2: 3}, window_needed=2 + step)
        assert engine.pool.cache.lengths.tolist() == [4, foreign_steps, foreign_steps]
        while engine.has_unfinished():
            engine.step()
        return engine.output(request).token_ids

    alone = tokens(0)
    assert tokens(3) == alone
    assert len(set(alone)) >= 4


@pytest.mark.parametrize("stack", [STACKS["mixed"], STACKS["mla"]], ids=["mixed", "mla"])
def test_the_static_decode_step_reads_no_tensor_value_on_the_host(make_history_model, stack,
                                                                   monkeypatch):
    """As a CUDA graph capture runs it: `is_compiling()` true makes the experts take their
    sync-free path on this CPU, as they do on a GPU."""
    model = make_history_model(**stack)
    engine = static_engine(model, capture=False)
    engine.add_request(prompts(lengths=(4,))[0], SamplingParams(max_tokens=4))
    engine.step()  # the prompt in one chunk, the first token sampled
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: pytest.fail("tolist on the host"))
    with HostReadWatch() as watch:
        engine.graphs.decode({0: engine.requests[0].tokens[-1]}, window_needed=5)
    assert watch.reads == []


def test_the_compiled_static_step_gives_the_eager_engines_tokens(make_history_model):
    """fullgraph: the decode forward (every mixer, token-routed and learned experts, mu)
    traces as one graph; aot_eager traces what inductor would, without code generation."""
    model = make_history_model(mixer_pattern="AML", num_hidden_layers=3, mlp_pattern="TED",
                               mu_guidance=True)
    eager = staggered(Engine(model, max_batch=3, prefill_chunk=4), requests()[:3])
    engine = Engine(model, max_batch=3, prefill_chunk=4, cuda_graphs=False)
    engine.graphs = DecodeGraphs(model, engine.pool, capture=False, compile=True,
                                 backend="aot_eager")
    compiled = staggered(engine, requests()[:3])
    assert [o.token_ids for o in compiled] == [o.token_ids for o in eager]
    assert all(len(set(o.token_ids)) >= 4 for o in compiled)


def test_cuda_graphs_are_off_on_cpu_and_refused_when_asked(make_history_model):
    model = make_history_model(**STACKS["gqa"])
    engine = Engine(model, max_batch=2)
    assert engine.graphs is None and engine.warm_up() == 0
    with pytest.raises(ValueError, match="CUDA graphs need the model on a CUDA device"):
        Engine(model, max_batch=2, cuda_graphs=True)
    with pytest.raises(ValueError, match="cuda_graphs='yes'"):
        Engine(model, max_batch=2, cuda_graphs="yes")
    with pytest.raises(ValueError, match="compile_decode=True .* needs cuda_graphs"):
        Engine(model, max_batch=2, compile_decode=True)


@pytest.mark.gpu
def test_compiled_cuda_graph_decode_gives_the_eager_engines_tokens(make_history_model):
    """fp32: inductor fuses and reorders the arithmetic, so in bf16 a greedy choice between
    near-tied logits may flip (observed), which says nothing about the cache or the graph."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    model = make_history_model(**STACKS["mixed"], mu_guidance=True).to("cuda")
    eager = staggered(Engine(model, max_batch=3, prefill_chunk=4, cuda_graphs=False),
                      requests())
    engine = Engine(model, max_batch=3, prefill_chunk=4, compile_decode=True)
    graphed = staggered(engine, requests())
    assert [o.token_ids for o in graphed] == [o.token_ids for o in eager]
    assert all(len(set(o.token_ids)) >= 4 for o in graphed)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("stack", STATIC_STACKS.values(), ids=STATIC_STACKS.keys())
def test_cuda_graph_decode_gives_the_eager_engines_tokens(make_history_model, stack, dtype):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    model = make_history_model(**stack).to("cuda", dtype)
    eager = staggered(Engine(model, max_batch=3, prefill_chunk=4, cuda_graphs=False),
                      requests())
    engine = Engine(model, max_batch=3, prefill_chunk=4)  # graphs: on by default on CUDA
    assert engine.graphs is not None and engine.graphs.capture
    captured = engine.warm_up()
    graphs = engine.graphs
    assert captured == len(graphs.row_buckets) * len(graphs.window_buckets) > 1
    graphed = staggered(engine, requests())
    assert len(graphs.graphs) == captured  # every step replayed a graph captured up front
    assert [o.token_ids for o in graphed] == [o.token_ids for o in eager]
    assert all(len(set(o.token_ids)) >= 4 for o in graphed)
    assert engine.pool.cache.lengths.tolist() == [0, 0, 0]
