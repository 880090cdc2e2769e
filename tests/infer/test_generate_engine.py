"""`HybridLM.generate` is a thin call into the engine: every prompt becomes one engine request,
and its tokens are the engine's, greedy and sampled, for every mixer."""

import pytest
import torch

from hybridlm.infer.engine import Engine
from hybridlm.infer.sampling_params import SamplingParams

STACKS = {
    "gqa": dict(mixer_pattern="A"),
    "mla": dict(mixer_pattern="L"),
    "mamba": dict(mixer_pattern="M"),
    "mixed": dict(mixer_pattern="AMLM", num_hidden_layers=4, mlp_pattern="TE"),
}
STEPS = 8
SAMPLING = dict(temperature=0.8, top_k=20, top_p=0.9)


def prompts(seed: int = 9, lengths=(3, 11, 1, 6)) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 97, (n,), generator=g).tolist() for n in lengths]


def engine_run(model, batch: list[list[int]], params: SamplingParams,
               generator: torch.Generator | None = None) -> list[list[int]]:
    """Each prompt + its tokens from an engine built here (its default pool and chunk, not
    generate's), the requests sharing `generator` as generate's rows do."""
    engine = Engine(model, max_batch=len(batch))
    ids = [engine.add_request(p, params, generator=generator) for p in batch]
    while engine.has_unfinished():
        engine.step()
    return [p + engine.output(i).token_ids for p, i in zip(batch, ids, strict=True)]


@pytest.mark.parametrize("stack", STACKS.values(), ids=STACKS.keys())
def test_generate_gives_the_engines_tokens_greedy_and_sampled(make_history_model, stack,
                                                               monkeypatch):
    model = make_history_model(**stack)
    batch = prompts()
    seen = []
    add_request = Engine.add_request
    monkeypatch.setattr(Engine, "add_request", lambda self, p, *a, **k: (
        seen.append(list(p)), add_request(self, p, *a, **k))[1])
    greedy = model.generate(batch, STEPS, do_sample=False)
    sampled = model.generate(batch, STEPS, generator=torch.Generator().manual_seed(5),
                             **SAMPLING)
    assert seen == batch + batch  # one request per prompt, per call
    monkeypatch.setattr(Engine, "add_request", add_request)

    assert greedy == engine_run(model, batch, SamplingParams(max_tokens=STEPS, temperature=0))
    # varied continuations: a row repeating one token would match whatever the cache held
    assert all(len(set(row[len(p):])) >= 4 for row, p in zip(greedy, batch, strict=True))
    params = SamplingParams(max_tokens=STEPS, **SAMPLING)
    assert sampled == engine_run(model, batch, params, torch.Generator().manual_seed(5))
    assert sampled != greedy
    other_seed = model.generate(batch, STEPS, generator=torch.Generator().manual_seed(6),
                                **SAMPLING)
    assert other_seed != sampled  # the generator drives the draws
    # a padded tensor gives the same tokens, as a tensor (B, T0 + n)
    ids = torch.tensor([p + [0] * (11 - len(p)) for p in batch])
    mask = (torch.arange(11) < torch.tensor([len(p) for p in batch])[:, None]).long()
    tensor_out = model.generate(ids, STEPS, attention_mask=mask, do_sample=False)
    assert tensor_out[:, 11:].tolist() == [row[len(p):] for row, p in zip(greedy, batch,
                                                                          strict=True)]


def test_without_a_generator_torch_manual_seed_makes_sampling_reproducible(make_history_model):
    model = make_history_model(**STACKS["gqa"])
    prompt = torch.tensor([prompts()[1]])
    torch.manual_seed(0)
    first = model.generate(prompt, STEPS)
    torch.manual_seed(0)
    assert torch.equal(model.generate(prompt, STEPS), first)
    torch.manual_seed(1)
    assert not torch.equal(model.generate(prompt, STEPS), first)


def test_generate_keeps_the_models_mode_and_zero_new_tokens_give_the_prompts(make_model):
    model = make_model().train()
    batch = prompts(lengths=(2, 4))
    assert model.generate(batch, 0) == batch
    ids = torch.tensor([batch[1]])
    assert torch.equal(model.generate(ids, 0), ids)
    assert model.generate(ids, 3, do_sample=False).shape == (1, 7)
    assert model.training  # the engine evaluates in eval mode; generate gives the mode back


def test_bad_prompts_are_refused_before_the_engine_runs(make_model):
    model = make_model()
    with pytest.raises(ValueError, match=r"token id 97 is outside \[0, vocab_size=97\)"):
        model.generate([[1, 2], [97]], 2)
    with pytest.raises(ValueError, match="integer tensor"):
        model.generate(torch.ones(1, 3), 2)
    with pytest.raises(ValueError, match="input_ids is empty"):
        model.generate(torch.ones(1, 0, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="at least one prompt"):
        model.generate([], 2)
    for bad in (-1, 2.0, True):
        with pytest.raises(ValueError, match=f"eos_token_id={bad!r} must be an int >= 0"):
            model.generate([[1]], 2, eos_token_id=bad)
    eos = model.generate([[1]], 2, do_sample=False)[0][1]  # numpy / torch ints are ids too
    assert model.generate([[1]], 2, do_sample=False, eos_token_id=torch.tensor(eos)) == [
        [1, eos]]


def test_add_request_takes_a_generator_or_a_seed(make_model):
    engine = Engine(make_model(), max_batch=1)
    with pytest.raises(ValueError, match="generator and seed=3 both given"):
        engine.add_request([1], SamplingParams(seed=3), generator=torch.Generator())
    with pytest.raises(ValueError, match="generator=3 must be a torch.Generator"):
        engine.add_request([1], SamplingParams(), generator=3)
    assert not engine.has_unfinished()  # refused requests never queue


def test_a_pool_of_short_rows_refuses_longer_requests(make_model):
    model = make_model()
    engine = Engine(model, max_batch=2, max_len=10)
    per_row = 10 * model.kv_cache_bytes_per_token(torch.float32) + model.cache_fixed_bytes(
        torch.float32)
    assert engine.pool.cache.nbytes() == 2 * per_row
    with pytest.raises(ValueError, match="= 11 exceeds the engine's max_len=10"):
        engine.add_request([1] * 6, SamplingParams(max_tokens=5))
    for bad in (0, 65, 2.0):
        with pytest.raises(ValueError, match=f"max_len={bad!r} must be an int in"):
            Engine(model, max_len=bad)
