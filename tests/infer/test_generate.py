import pytest
import torch

from hybridlm.infer.sampler import next_token
from hybridlm.infer.sampling_params import SamplingParams

PARITY_ATOL = 1e-4  # cached vs full logits; measured float error ~5e-6 at logit scale ~6
STEPS = 12


def greedy_by_full_forwards(model, prompt: torch.Tensor, steps: int) -> torch.Tensor:
    """The greedy continuation recomputed from scratch at every step (no cache): (B, T0+steps)."""
    seq = prompt
    for _ in range(steps):
        nxt = model(seq).logits[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], 1)
    return seq


def distinct_per_row(tokens: torch.Tensor) -> list[int]:
    return [len(set(row.tolist())) for row in tokens]


def random_ids(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 97, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("overrides", [{}, {"pid_scaler": True, "mu_update": "ema"},
                                       {"mlp_pattern": "D", "mu_guidance": False}])
def test_cached_greedy_equals_step_by_step_full_forwards(make_history_model, overrides):
    model = make_history_model(**overrides)
    prompt = random_ids((2, 5))
    cached = model.generate(prompt, max_new_tokens=STEPS, do_sample=False)
    assert torch.equal(cached, greedy_by_full_forwards(model, prompt, STEPS))
    # a continuation of one repeated token would match whatever the cache held
    assert min(distinct_per_row(cached[:, 5:])) >= 4, cached


@pytest.mark.parametrize("breakage", ["kv_cache_forgets", "positions_restart_at_0"])
def test_a_cache_that_loses_the_history_fails_the_greedy_parity(
    make_history_model, break_cache, breakage
):
    model = make_history_model()
    prompt = random_ids((2, 5))
    expected = greedy_by_full_forwards(model, prompt, STEPS)  # no cache: unaffected
    break_cache(breakage)
    assert not torch.equal(model.generate(prompt, STEPS, do_sample=False), expected)


def test_cached_logits_equal_full_forward_logits(make_history_model):
    model = make_history_model()
    ids = random_ids((2, 10))
    full = model(ids).logits
    cache = model.new_cache(2, 10)
    steps = [model(ids[:, :4], cache=cache).logits]
    steps += [model(ids[:, t : t + 1], cache=cache).logits for t in range(4, 10)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=PARITY_ATOL, rtol=0)
    assert cache.length == 10
    # the tolerance is tiny next to what the history contributes: each token alone gives
    # logits that differ by O(1)
    alone = model(ids.reshape(-1, 1)).logits.view_as(full)
    assert (alone - full)[:, 1:].abs().amax() > 1000 * PARITY_ATOL


def first_index(row: torch.Tensor, token: int) -> int:
    return int((row == token).nonzero()[0])


def test_eos_pads_the_finished_row_while_the_other_keeps_going(make_history_model):
    model = make_history_model()
    prompt = random_ids((2, 4), seed=1)
    greedy = model.generate(prompt, max_new_tokens=8, do_sample=False)
    new = greedy[:, 4:]  # (2, 8)
    # eos: a token row 0 emits early, with different tokens after it, that row 1 never emits
    candidates = [t for t in new[0, :5].tolist()
                  if t not in new[1].tolist() and (new[0, first_index(new[0], t):] != t).any()]
    assert candidates, greedy
    eos = candidates[0]
    out = model.generate(prompt, max_new_tokens=8, do_sample=False, eos_token_id=eos)
    stop = first_index(new[0], eos)
    assert out.shape == greedy.shape
    assert torch.equal(out[0, : 4 + stop + 1], greedy[0, : 4 + stop + 1])
    assert (out[0, 4 + stop :] == eos).all()  # padded, where greedy went on with other tokens
    assert torch.equal(out[1], greedy[1])  # the unfinished row is untouched by the padding


def shared_token_at_different_steps(new: torch.Tensor) -> tuple[int, int, int]:
    """new (B, n) generated ids -> rows i, j and a token both emit, first at different steps."""
    for i in range(len(new)):
        for j in range(i + 1, len(new)):
            for token in set(new[i].tolist()) & set(new[j].tolist()):
                if first_index(new[i], token) != first_index(new[j], token):
                    return i, j, token
    raise AssertionError(f"no two rows share a token at different steps:\n{new}")


def test_eos_stops_once_every_row_has_finished(make_history_model):
    model = make_history_model()
    prompts = random_ids((6, 4), seed=1)
    i, j, eos = shared_token_at_different_steps(
        model.generate(prompts, max_new_tokens=10, do_sample=False)[:, 4:]
    )
    prompt = prompts[[i, j]]
    new = model.generate(prompt, max_new_tokens=10, do_sample=False)[:, 4:]
    stops = [first_index(new[row], eos) for row in range(2)]
    out = model.generate(prompt, max_new_tokens=10, do_sample=False, eos_token_id=eos)
    assert out.shape == (2, 4 + max(stops) + 1)  # ends at the later row's eos
    for row, stop in enumerate(stops):
        assert torch.equal(out[row, 4 : 4 + stop], new[row, :stop])
        assert (out[row, 4 + stop :] == eos).all()


def test_sampling_is_reproducible_with_a_generator(make_model):
    model = make_model()
    prompt = torch.randint(0, 97, (2, 3))
    a = model.generate(prompt, 8, generator=torch.Generator().manual_seed(3), top_k=10, top_p=0.9)
    b = model.generate(prompt, 8, generator=torch.Generator().manual_seed(3), top_k=10, top_p=0.9)
    assert torch.equal(a, b) and a.shape == (2, 11)


def test_top_k_and_top_p_restrict_the_support():
    """generate samples with the engine's sampler (do_sample=False: temperature 0)."""
    logits = torch.tensor([4.0, 3.0, 2.0, 1.0, 0.0])
    g = torch.Generator().manual_seed(0)
    none = torch.zeros(0, dtype=torch.long)

    def draws(**kw) -> set[int]:
        return {next_token(logits, SamplingParams(**kw), none, none, g) for _ in range(200)}

    assert draws(top_k=2) == {0, 1}
    # probs ~ [.64, .24, .09, .03, .01]: top_p=0.8 keeps the first two
    assert draws(top_p=0.8) == {0, 1}
    assert draws(temperature=0) == {0}


@pytest.mark.parametrize("kwargs, match", [
    (dict(temperature=0.0), "temperature=0.0"),
    (dict(top_k=0), "top_k=0"),
    (dict(top_p=1.5), "top_p=1.5"),
    (dict(max_new_tokens=100), "max_position_embeddings=64"),
])
def test_bad_generation_arguments(make_model, kwargs, match):
    model = make_model()
    args = {"max_new_tokens": 4, **kwargs}
    with pytest.raises(ValueError, match=match):
        model.generate(torch.zeros(1, 2, dtype=torch.long), **args)
