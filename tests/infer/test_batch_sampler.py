"""The batched sampler against its reference twin (`sampler`): equal masks, penalised
logits and greedy picks on random logits for many parameter mixes; a seeded request draws
the same tokens alone, in a mixed batch and through the reference; one read from the device
per engine step; logprobs equal the log_softmax of a full forward."""

from __future__ import annotations

import itertools

import pytest
import torch
from test_engine import STACKS, prompts

from hybridlm.infer.batch_sampler import BatchSampler, RowKnobs, narrowed_batch, penalised_rows
from hybridlm.infer.engine import Engine
from hybridlm.infer.sampler import narrowed, next_token, penalised
from hybridlm.infer.sampling_params import SamplingParams
from hybridlm.ops import use_impl

V = 50
MIXES = [  # every knob alone, and together, with values near the edges
    dict(temperature=t, top_k=k, top_p=p, min_p=m)
    for t, k, p, m in itertools.product((1e-8, 0.7, 1.0, 2.5), (None, 1, 5, 49, 50, 80),
                                        (1.0, 0.9, 0.3, 1e-6), (0.0, 0.05, 0.5))
]


def random_logits(rows: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, V, generator=g) * 3
    logits[0, :4] = logits[0, 4]  # ties at the top-k / top-p boundaries
    return logits


def test_masks_equal_the_reference_for_every_mix():
    logits = random_logits(len(MIXES), seed=0)
    params = [SamplingParams(**m) for m in MIXES]
    batched = narrowed_batch(logits, RowKnobs.of(params, V, logits.device), params)
    for row, p in enumerate(params):
        reference = narrowed(logits[row], p)
        assert torch.equal(batched[row], reference), p
    dropped = torch.isinf(batched).sum(dim=-1)
    assert dropped.min() == 0 and dropped.max() == V - 1  # the mixes span keep-all to one


def penalty_case(seed: int):
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, V, (7,), generator=g)
    output = torch.randint(0, V, (int(torch.randint(0, 12, (), generator=g)),), generator=g)
    return prompt, output


PENALTIES = [dict(repetition_penalty=r, presence_penalty=pr, frequency_penalty=f)
             for r, pr, f in itertools.product((1.0, 1.3, 0.6), (0.0, 0.5, -2.0),
                                               (0.0, 1.5, -0.7))]


def test_penalised_logits_equal_the_reference():
    logits = random_logits(len(PENALTIES), seed=1)
    params = [SamplingParams(**p) for p in PENALTIES]
    sampler = BatchSampler(len(params), V, torch.device("cpu"))
    cases = [penalty_case(seed=row) for row in range(len(params))]
    for row, (p, (prompt, _)) in enumerate(zip(params, cases, strict=True)):
        sampler.admit(row, p, prompt)
    for row, (_, output) in enumerate(cases):
        for token in output.tolist():  # as the steps that generated them would have counted
            sampler.counts[row, token] += 1
    knobs = RowKnobs.of(params, V, logits.device)
    batched = penalised_rows(logits, knobs, sampler.counts, sampler.prompt_seen)
    for row, (p, (prompt, output)) in enumerate(zip(params, cases, strict=True)):
        assert torch.equal(batched[row], penalised(logits[row], p, prompt, output)), p
    assert not torch.equal(batched, logits)


def test_greedy_rows_pick_the_argmax_and_counts_follow_the_picks():
    logits = random_logits(6, seed=2)
    params = [SamplingParams(temperature=0, frequency_penalty=1.0)] * 6
    sampler = BatchSampler(8, V, torch.device("cpu"))
    rows = [7, 0, 3, 1, 2, 5]
    for row in rows:
        sampler.admit(row, params[0], torch.tensor([0]))
    picks = sampler.sample(logits, rows, params, [None] * 6)
    assert [t for t, _ in picks] == logits.argmax(-1).tolist()
    assert all(lp is None for _, lp in picks)
    for row, (token, _) in zip(rows, picks, strict=True):
        assert sampler.counts[row].nonzero().flatten().tolist() == [token]


SEEDED = SamplingParams(temperature=1.3, top_k=20, top_p=0.95, seed=1234)
OTHERS = [SamplingParams(temperature=0), SamplingParams(temperature=0.8, min_p=0.1),
          SamplingParams(temperature=1.0, seed=5), SamplingParams(temperature=2.0, top_p=0.5)]


def draws(batch: list[SamplingParams], steps: int = 6) -> list[list[int]]:
    """The tokens each row draws over `steps` steps of fixed random logits."""
    sampler = BatchSampler(len(batch), V, torch.device("cpu"))
    generators = [torch.Generator().manual_seed(p.seed) if p.seed is not None else None
                  for p in batch]
    out = []
    for step in range(steps):
        logits = random_logits(1, seed=10 + step).expand(len(batch), V)
        out.append([t for t, _ in sampler.sample(logits, list(range(len(batch))), batch,
                                                 generators)])
    return [list(column) for column in zip(*out, strict=True)]


def test_a_seeded_row_draws_the_same_alone_in_a_batch_and_in_the_reference():
    alone = draws([SEEDED])[0]
    assert draws([*OTHERS[:2], SEEDED, *OTHERS[2:]])[2] == alone
    assert draws([SEEDED, *OTHERS])[0] == alone
    generator = torch.Generator().manual_seed(SEEDED.seed)
    empty = torch.zeros(0, dtype=torch.long)
    reference = [next_token(random_logits(1, seed=10 + step)[0], SEEDED, empty, empty,
                            generator) for step in range(6)]
    assert reference == alone
    assert len(set(alone)) >= 4, alone  # a real draw, not a stuck argmax
    other_seed = draws([SamplingParams(temperature=1.3, top_k=20, top_p=0.95, seed=1235)])[0]
    assert other_seed != alone


MIXED = [SamplingParams(max_tokens=9, temperature=0),
         SamplingParams(max_tokens=9, temperature=1.2, seed=7, top_k=30, logprobs=3),
         SamplingParams(max_tokens=9, temperature=0.9, seed=8, top_p=0.8, min_p=0.02,
                        repetition_penalty=1.3),
         SamplingParams(max_tokens=9, temperature=0, presence_penalty=1.5,
                        frequency_penalty=0.5, logprobs=0),
         SamplingParams(max_tokens=9, temperature=1.5, seed=9, frequency_penalty=-1.0)]


def run_mixed(model) -> list:
    engine = Engine(model, max_batch=3, prefill_chunk=4)  # rows join and leave mid-way
    return engine.generate(prompts(seed=9)[:len(MIXED)], MIXED)


def test_the_engine_draws_what_the_reference_draws(make_history_model):
    model = make_history_model(**STACKS["gqa"])
    batched = run_mixed(model)
    with use_impl("reference"):
        reference = run_mixed(model)
    for out, ref in zip(batched, reference, strict=True):
        assert out.token_ids == ref.token_ids
        assert len(set(out.token_ids)) >= 4, out.token_ids
        if ref.logprobs is None:
            assert out.logprobs is None
            continue
        for got, want in zip(out.logprobs, ref.logprobs, strict=True):
            assert got.token_id == want.token_id
            assert got.logprob == pytest.approx(want.logprob, abs=1e-6)
            assert [t for t, _ in got.top] == [t for t, _ in want.top]


def test_one_read_from_the_device_per_step(make_history_model, monkeypatch):
    model = make_history_model(**STACKS["gqa"])
    engine = Engine(model, max_batch=5)
    for prompt, params in zip(prompts(seed=9), MIXED, strict=False):
        engine.add_request(prompt, params)
    reads: list[str] = []
    draw = engine._draw_queued

    def counted_draw() -> None:
        with monkeypatch.context() as patch:
            for name in ("tolist", "item", "__int__", "__float__", "__bool__", "__index__"):
                original = getattr(torch.Tensor, name)
                patch.setattr(torch.Tensor, name, lambda self, *a, _n=name, _o=original, **k:
                              (reads.append(_n), _o(self, *a, **k))[1])
            draw()

    engine._draw_queued = counted_draw
    for _ in range(4):  # the prefill step, then decode steps of all 5 rows
        reads.clear()
        engine.step()
        assert reads == ["tolist"], reads
    assert len(engine.running) == 5


def test_logprobs_are_the_log_softmax_of_the_raw_logits(make_history_model):
    model = make_history_model(**STACKS["mamba"])
    prompt = prompts(seed=3, lengths=(6,))[0]
    params = SamplingParams(max_tokens=8, temperature=1.4, seed=3, presence_penalty=2.0,
                            top_k=10, logprobs=4)
    out = Engine(model, max_batch=2).generate([prompt, prompt], [params, SamplingParams(
        max_tokens=5, temperature=0)])[0]
    ids = torch.tensor([prompt + out.token_ids])
    with torch.no_grad():
        full = model(ids).logits[0].float().log_softmax(-1)  # (T, V)
    assert len(out.logprobs) == len(out.token_ids) == 8
    for i, entry in enumerate(out.logprobs):
        row = full[len(prompt) - 1 + i]
        assert entry.token_id == out.token_ids[i]
        assert entry.logprob == pytest.approx(float(row[entry.token_id]), abs=1e-4)
        best = row.topk(4)
        assert [t for t, _ in entry.top] == best.indices.tolist()
        assert [v for _, v in entry.top] == pytest.approx(best.values.tolist(), abs=1e-4)


def test_choices_of_a_seeded_request_are_seed_plus_i(make_history_model):
    model = make_history_model(**STACKS["gqa"])
    prompt = prompts(seed=4, lengths=(5,))[0]
    params = SamplingParams(max_tokens=8, temperature=1.5, seed=40)
    engine = Engine(model, max_batch=4)
    ids = engine.add_choices(prompt, params, 3)
    while engine.has_unfinished():
        engine.step()
    choices = [engine.output(i).token_ids for i in ids]
    for i, tokens in enumerate(choices):
        alone = Engine(model, max_batch=1).generate([prompt], SamplingParams(
            max_tokens=8, temperature=1.5, seed=40 + i))[0].token_ids
        assert tokens == alone
    assert len({tuple(c) for c in choices}) == 3
    assert engine.sampler.counts is None  # no penalties asked: no (B, V) count buffers
    with pytest.raises(ValueError, match="seed"):
        engine.add_choices(prompt, SamplingParams(seed=2**64 - 2), 3)
    assert not engine.waiting


def test_a_request_waiting_past_the_queue_timeout_ends_with_timeout(make_history_model):
    model = make_history_model(**STACKS["gqa"])
    a, b = prompts(seed=5, lengths=(4, 4))
    engine = Engine(model, max_batch=1, queue_timeout=30)
    long = engine.add_request(a, SamplingParams(max_tokens=20, temperature=0))
    engine.step()
    late = engine.add_request(b, SamplingParams(max_tokens=3, temperature=0))
    engine.step()
    assert not engine.requests[late].finished  # still within its time
    engine.requests[late].queued_at -= 31  # as if it had waited 31 s
    finished = engine.step()
    assert [o.request_id for o in finished] == [late]
    assert finished[0].finish_reason == "timeout" and finished[0].token_ids == []
    assert list(engine.stream(late))[-1].finish_reason == "timeout"
    while engine.has_unfinished():
        engine.step()
    assert engine.output(long).finish_reason == "length"
    with pytest.raises(ValueError, match="queue_timeout"):
        Engine(model, queue_timeout=0)
