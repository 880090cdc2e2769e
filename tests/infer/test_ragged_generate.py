"""Prompts of different lengths generate together: the caches hold a length per sequence, and
each row gets exactly the tokens it gets when generated alone, for every mixer."""

import pytest
import torch

STACKS = {
    "gqa": dict(mixer_pattern="A"),
    "mla": dict(mixer_pattern="L"),
    "mla_absorbed": dict(mixer_pattern="L", mla_absorb=True),
    "mamba": dict(mixer_pattern="M"),
    "mixed": dict(mixer_pattern="AMLM", num_hidden_layers=4, mlp_pattern="E"),
}
LENGTHS = (3, 7, 1, 5)  # the longest not first, and a one-token prompt
STEPS = 8
PARITY_ATOL = 1e-4  # cached vs full logits; float error ~1e-5 at logit scale ~6


def ragged_prompts(seed: int = 0, lengths=LENGTHS) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 97, (n,), generator=g).tolist() for n in lengths]


def alone(model, prompt: list[int], steps: int = STEPS, **kwargs) -> list[int]:
    return model.generate(torch.tensor([prompt]), steps, do_sample=False, **kwargs)[0].tolist()


def new_tokens(out: list[list[int]], prompts: list[list[int]]) -> list[list[int]]:
    return [row[len(p):] for row, p in zip(out, prompts, strict=True)]


def padded(prompts: list[list[int]], left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """-> ids (B, T), attention_mask (B, T), padding (id 0) on the left or on the right."""
    width = max(map(len, prompts))
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        cols = slice(width - len(p), width) if left else slice(0, len(p))
        ids[row, cols], mask[row, cols] = torch.tensor(p), 1
    return ids, mask


@pytest.mark.parametrize("stack", STACKS.values(), ids=STACKS.keys())
def test_each_prompt_gets_the_tokens_it_gets_alone(make_history_model, stack):
    model = make_history_model(**stack)
    prompts = ragged_prompts()
    out = model.generate(prompts, STEPS, do_sample=False)
    assert out == [alone(model, p) for p in prompts]
    # varied continuations: a row repeating one token would match whatever the cache held
    assert sum(len(set(row)) >= 4 for row in new_tokens(out, prompts)) >= 3, out
    for left in (True, False):  # the same tokens from a padded tensor + attention_mask
        ids, mask = padded(prompts, left)
        tensor_out = model.generate(ids, STEPS, do_sample=False, attention_mask=mask)
        assert tensor_out.shape == (len(prompts), ids.shape[1] + STEPS)
        assert torch.equal(tensor_out[:, : ids.shape[1]], ids)
        assert tensor_out[:, ids.shape[1]:].tolist() == new_tokens(out, prompts)


@pytest.mark.parametrize("stack", STACKS.values(), ids=STACKS.keys())
def test_ragged_cached_logits_equal_each_rows_full_forward(make_history_model, stack):
    """A right-padded prefill (rows stop at their own lengths), then decode steps where every
    row continues at its own position: each row's logits are its full forward's."""
    model = make_history_model(**stack)
    lengths = torch.tensor([2, 6, 4])
    ids = torch.randint(0, 97, (3, 9), generator=torch.Generator().manual_seed(1))
    cache = model.new_cache(3, 9)
    with torch.no_grad():
        prefill = model(ids[:, :6], cache=cache, input_lengths=lengths).logits
        steps = [model(ids[torch.arange(3), lengths + t][:, None], cache=cache).logits
                 for t in range(3)]
    assert cache.lengths.tolist() == [5, 9, 7]
    for row, n in enumerate(lengths.tolist()):
        own = torch.cat([ids[row, :n], ids[row, n:n + 3]])
        full = model(own[None]).logits[0]  # (n + 3, V)
        cached = torch.cat([prefill[row, :n]] + [s[row] for s in steps])
        torch.testing.assert_close(cached, full, atol=PARITY_ATOL, rtol=0)


@pytest.mark.parametrize("breakage, stack", [
    ("positions_of_row_0", STACKS["gqa"]),
    ("positions_of_row_0", STACKS["mla_absorbed"]),
    ("padding_advances_mamba_ssm", STACKS["mamba"]),
    ("padding_enters_mamba_conv", STACKS["mamba"]),
])
def test_a_batch_that_mixes_its_rows_up_fails(make_history_model, break_cache, breakage,
                                              stack):
    model = make_history_model(**stack)
    prompts = ragged_prompts()
    expected = [alone(model, p) for p in prompts]  # one row: nothing to mix up
    break_cache(breakage)
    assert model.generate(prompts, STEPS, do_sample=False) != expected


def test_eos_and_stop_strings_end_each_row_where_it_ends_alone(make_history_model):
    model = make_history_model(mixer_pattern="AM", num_hidden_layers=2)
    prompts = ragged_prompts(seed=2)
    free = model.generate(prompts, STEPS, do_sample=False)
    eos = free[1][len(prompts[1]) + 2]  # row 1 emits it third, so at least row 1 stops early
    out = model.generate(prompts, STEPS, do_sample=False, eos_token_id=eos)
    assert out == [alone(model, p, eos_token_id=eos) for p in prompts]
    assert len(out[1]) == len(prompts[1]) + 3 and out[1][-1] == eos  # no padding after it
    assert STEPS in map(len, new_tokens(out, prompts))  # another row runs on
    # a stop string ends a row the same way (decoded by a tokenizer of one char per id)
    tokenizer = type("Chars", (), {"decode": staticmethod(lambda ids: "".join(
        chr(65 + i % 26) for i in ids))})()
    stop = tokenizer.decode([free[0][len(prompts[0]) + 1]])
    kwargs = dict(eos_token_id=96, stop_strings=[stop], tokenizer=tokenizer)
    out = model.generate(prompts, STEPS, do_sample=False, **kwargs)
    assert out == [alone(model, p, **kwargs) for p in prompts]
    assert len(out[0]) <= len(prompts[0]) + 2


@pytest.mark.parametrize("mask, match", [
    ([[1, 0, 1]], "row 0 has padding between tokens"),
    ([[0, 0, 0]], "prompt 0 is empty"),
    ([[1, 2, 1]], "only 0"),
    ([[1, 1]], "shaped like input_ids"),
])
def test_bad_attention_masks_are_refused(make_model, mask, match):
    with pytest.raises(ValueError, match=match):
        make_model().generate(torch.ones(1, 3, dtype=torch.long), 2,
                              attention_mask=torch.tensor(mask))


def test_input_lengths_are_checked(make_model):
    model = make_model()
    ids = torch.ones(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="input_lengths needs a cache"):
        model(ids, input_lengths=torch.tensor([1, 3]))
    with pytest.raises(ValueError, match=r"input_lengths holds 4, outside \[0, 3\]"):
        model(ids, cache=model.new_cache(2, 8), input_lengths=torch.tensor([1, 4]))
    with pytest.raises(ValueError, match="different lengths"):
        cache = model.new_cache(2, 8)
        model(ids, cache=cache, input_lengths=torch.tensor([1, 3]))
        cache.length  # noqa: B018 (rows hold 1 and 3 tokens: no single length)
