import pytest
import torch

from hybridlm.infer.generate import sample_next


@pytest.mark.parametrize("overrides", [{}, {"use_dynamic_scaler": True, "mu_update": "ema"},
                                       {"mlp_type": "dense", "use_mu_guidance": False}])
def test_cached_greedy_equals_step_by_step_full_forwards(make_model, overrides):
    model = make_model(**overrides)
    prompt = torch.randint(0, 97, (2, 5))
    cached = model.generate(prompt, max_new_tokens=12, do_sample=False)
    seq = prompt
    for _ in range(12):
        nxt = model(seq).logits[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], 1)
    assert torch.equal(cached, seq)


def test_cached_logits_equal_full_forward_logits(make_model):
    model = make_model()
    ids = torch.randint(0, 97, (2, 10))
    full = model(ids).logits
    cache = model.new_cache(2, 10)
    steps = [model(ids[:, :4], cache=cache).logits]
    steps += [model(ids[:, t : t + 1], cache=cache).logits for t in range(4, 10)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)
    assert cache.length == 10


def test_eos_stops_and_pads(make_model):
    model = make_model()
    prompt = torch.randint(0, 97, (1, 3))
    greedy = model.generate(prompt, max_new_tokens=6, do_sample=False)
    eos = int(greedy[0, 3])  # the first generated token
    out = model.generate(prompt, max_new_tokens=6, do_sample=False, eos_token_id=eos)
    assert out.shape == (1, 4) and int(out[0, -1]) == eos


def test_sampling_is_reproducible_with_a_generator(make_model):
    model = make_model()
    prompt = torch.randint(0, 97, (2, 3))
    a = model.generate(prompt, 8, generator=torch.Generator().manual_seed(3), top_k=10, top_p=0.9)
    b = model.generate(prompt, 8, generator=torch.Generator().manual_seed(3), top_k=10, top_p=0.9)
    assert torch.equal(a, b) and a.shape == (2, 11)


def test_top_k_and_top_p_restrict_the_support():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    g = torch.Generator().manual_seed(0)
    draws = {int(sample_next(logits, True, top_k=2, generator=g)) for _ in range(200)}
    assert draws == {0, 1}
    # probs ~ [.64, .24, .09, .03, .01]: top_p=0.8 keeps the first two
    draws = {int(sample_next(logits, True, top_p=0.8, generator=g)) for _ in range(200)}
    assert draws == {0, 1}
    assert int(sample_next(logits, False)) == 0


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
