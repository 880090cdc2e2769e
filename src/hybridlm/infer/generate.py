"""`HybridLM.generate` on the engine: a batch of prompts in the shapes HF transformers takes
(a tensor, a tensor with an attention_mask, or a list of id lists), each run as one request
of a `hybridlm.infer.engine.Engine` sized for them, and the results shaped back.

Glossary: B batch, T0 prompt length (padded), n new tokens.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence

import torch

from hybridlm.infer.engine import Engine
from hybridlm.infer.request import RequestOutput
from hybridlm.infer.sampling_params import SamplingParams

INPUT_ID_DTYPES = (torch.long, torch.int32, torch.int64)


def cut_at_stop_strings(text: str, stop_strings: Sequence[str]) -> str:
    """The text before the first occurrence of any stop string (all of it if none occurs)."""
    cut = min((i for i in (text.find(x) for x in stop_strings) if i >= 0), default=len(text))
    return text[:cut]


def check_sampling_args(max_new_tokens: int, temperature: float, top_k: int | None,
                        top_p: float | None) -> None:
    """Raise ValueError naming the first argument that `generate` cannot use."""
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 0")
    if not (math.isfinite(temperature) and temperature > 0):  # NaN compares false
        raise ValueError(f"temperature={temperature} must be a finite number > 0 (for greedy "
                         "decoding: do_sample=False, or --greedy on the command line)")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k={top_k} must be >= 1 or None")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p} must lie in (0, 1] or be None")


def _checked_eos(eos_token_id) -> int | None:
    """eos_token_id as an int (numpy and 0-d torch integers too), ValueError if it is none."""
    if eos_token_id is None:
        return None
    try:
        eos = operator.index(eos_token_id) if not isinstance(eos_token_id, bool) else -1
    except TypeError:
        eos = -1
    if eos < 0:
        raise ValueError(f"eos_token_id={eos_token_id!r} must be an int >= 0 or None")
    return eos


def _check_stop_strings(strings, tokenizer, eos_token_id: int | None) -> None:
    if isinstance(strings, str) or not strings or not all(
            isinstance(x, str) and x for x in strings):
        raise ValueError(f"stop_strings={strings!r} must be a non-empty list of non-empty "
                         "strings")
    if tokenizer is None:
        raise ValueError("stop_strings needs the tokenizer that decodes the tokens")
    if eos_token_id is None:
        raise ValueError("stop_strings needs eos_token_id: it pads the rows that stopped")


@torch.no_grad()
def generate(
    model,
    input_ids: torch.Tensor | Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    attention_mask: torch.Tensor | None = None,
    do_sample: bool = True,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | None = None,
    generator: torch.Generator | None = None,
    stop_strings: Sequence[str] | None = None,
    tokenizer=None,
) -> torch.Tensor | list[list[int]]:
    """input_ids (B, T0) -> (B, T0 + n) on the model's device, n <= max_new_tokens (fewer
    when every row ended at eos or a stop string; rows that ended sooner are padded with
    eos_token_id).

    Prompts of different lengths, two ways; each row gets the tokens it gets alone (greedy):
    - a list of id lists -> a list of id lists: each prompt followed by its own new tokens,
      ending at its eos / stop-string token (no padding), as `generate` of that prompt alone.
    - input_ids (B, T) with attention_mask (B, T) (1 = token, 0 = padding; rows left- or
      right-padded, as in HF transformers) -> (B, T + n): input_ids as given, then the new
      tokens.

    Every prompt is a request of one Engine with a row per prompt, rows of prompt +
    max_new_tokens tokens (the cache the longest sequence needs) and a prefill chunk that
    takes the longest prompt whole, so all rows prefill in one forward and then decode
    together, each at its own position.

    stop_strings (with the `tokenizer`, as in HF transformers): a row also stops once its
    generated text contains one of them; the output keeps the tokens up to the one that
    completed it (cut the text with `cut_at_stop_strings`). eos_token_id is then required.

    Sampling (do_sample=True): every row draws in turn from `generator` (on the model's
    device), so the same generator state gives the same tokens; None: a generator seeded
    from torch's global random state, so `torch.manual_seed` makes generate reproducible.
    The stream differs from hybridlm's generate before the engine, which drew all rows at
    once from one (B, V) multinomial and kept drawing for rows that had ended: on CPU the
    tokens were measured equal up to the first row that ends before the others and differ
    after it; on CUDA a (B, V) multinomial and B (V,) ones need not draw alike at all."""
    check_sampling_args(max_new_tokens, temperature, top_k, top_p)
    eos_token_id = _checked_eos(eos_token_id)
    if stop_strings is not None:
        _check_stop_strings(stop_strings, tokenizer, eos_token_id)
    model.check_causal()
    prompts = _prompt_lists(input_ids, attention_mask, model.config.vocab_size)
    longest = max(map(len, prompts))
    limit = model.config.max_position_embeddings
    total = longest + max_new_tokens
    if total > limit:
        raise ValueError(
            f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) = {total}"
            f" exceeds max_position_embeddings={limit}"
        )
    outputs, device = _run(model, prompts, max_new_tokens, do_sample, temperature, top_k,
                           top_p, eos_token_id, generator, stop_strings, tokenizer)
    # A row that ended on eos: the engine leaves the stop token out, generate keeps it.
    new = [out.token_ids + ([out.stop_token_id] if out.stop_token_id is not None else [])
           for out in outputs]
    if not isinstance(input_ids, torch.Tensor):
        return [prompt + row for prompt, row in zip(prompts, new, strict=True)]
    ids = input_ids if attention_mask is not None or input_ids.dim() == 2 else input_ids[None]
    return torch.cat([ids.to(device), _padded(new, eos_token_id, device)], dim=1)


def _run(model, prompts: list[list[int]], max_new_tokens: int, do_sample: bool,
         temperature: float, top_k: int | None, top_p: float | None,
         eos_token_id: int | None, generator: torch.Generator | None,
         stop_strings: Sequence[str] | None, tokenizer
         ) -> tuple[list[RequestOutput], torch.device]:
    """Each prompt as one request of an engine sized for them -> their outputs, in order,
    and the device the engine ran on."""
    longest = max(map(len, prompts))
    was_training = model.training  # the engine puts the model in eval mode
    try:
        engine = Engine(model, tokenizer if stop_strings else None, max_batch=len(prompts),
                        prefill_chunk=longest, max_len=longest + max_new_tokens)
        if max_new_tokens == 0:  # nothing to generate (SamplingParams needs max_tokens >= 1)
            return [RequestOutput(i, p, [], None, True, "length")
                    for i, p in enumerate(prompts)], engine.device
        params = SamplingParams(
            max_tokens=max_new_tokens, temperature=temperature if do_sample else 0.0,
            top_k=top_k, top_p=1.0 if top_p is None else top_p,
            stop_token_ids=() if eos_token_id is None else (eos_token_id,),
            stop=tuple(stop_strings or ()))
        if do_sample and generator is None:
            seed = int(torch.randint(2**62, (1,)))  # from the global generator
            generator = torch.Generator(device=engine.device).manual_seed(seed)
        ids = [engine.add_request(p, params, generator=generator if do_sample else None)
               for p in prompts]
        while engine.has_unfinished():
            engine.step()
        return [engine.output(i) for i in ids], engine.device
    finally:
        model.train(was_training)


def _padded(rows: list[list[int]], eos_token_id: int | None, device) -> torch.Tensor:
    """New tokens of each row -> (B, n), n the longest row, the shorter ones padded with
    eos_token_id (rows differ in length only when they ended at eos or a stop string, both
    of which need it)."""
    width = max(map(len, rows))
    fill = 0 if eos_token_id is None else eos_token_id  # without eos no row ends early
    out = torch.full((len(rows), width), fill, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, :len(row)] = torch.tensor(row, dtype=torch.long)
    return out.to(device)


def _prompt_lists(input_ids, attention_mask: torch.Tensor | None,
                  vocab: int) -> list[list[int]]:
    """The prompts as lists of ids: a list of id lists as given, the rows of input_ids
    (B, T0) (or (T0,): one prompt), or those rows without the positions attention_mask
    (B, T0) marks 0 (left or right padding). ValueError for what the model cannot read."""
    if isinstance(input_ids, torch.Tensor):
        ids = input_ids[None] if input_ids.dim() == 1 and attention_mask is None else input_ids
        if ids.dim() != 2 or ids.dtype not in INPUT_ID_DTYPES:
            raise ValueError(f"input_ids must be an integer tensor of shape (batch, seq); got "
                             f"{ids.dtype} of shape {tuple(ids.shape)}")
        if ids.numel() == 0:
            raise ValueError("input_ids is empty")
    if attention_mask is None:
        prompts = [list(map(int, p)) for p in input_ids] if not isinstance(
            input_ids, torch.Tensor) else ids.tolist()
    else:
        prompts = _unpad(input_ids, attention_mask)
    if not prompts:
        raise ValueError("generate needs at least one prompt; got an empty list")
    for i, prompt in enumerate(prompts):
        if not prompt:
            raise ValueError(f"prompt {i} is empty: every prompt needs at least one token")
    bad = [t for prompt in prompts for t in prompt if not 0 <= t < vocab]
    if bad:
        raise ValueError(f"token id {bad[0]} is outside [0, vocab_size={vocab})")
    return prompts


def _unpad(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[list[int]]:
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or (
            attention_mask.shape != input_ids.shape):
        raise ValueError(f"attention_mask must be shaped like input_ids (batch, seq); got "
                         f"{tuple(attention_mask.shape)} for input_ids "
                         f"{tuple(getattr(input_ids, 'shape', ()))}")
    mask = attention_mask.to(torch.long)
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError("attention_mask must hold only 0 (padding) and 1 (token)")
    # One run of ones per row: left padding (0..01..1) or right padding (1..10..0).
    gaps = _runs_of_ones(mask) > 1  # (B,)
    if bool(gaps.any()):
        row = int(gaps.nonzero()[0])
        raise ValueError(f"attention_mask row {row} has padding between tokens; only left or "
                         "right padding is allowed")
    return [ids[m.bool()].tolist() for ids, m in zip(input_ids, mask, strict=True)]


def _runs_of_ones(mask: torch.Tensor) -> torch.Tensor:
    """mask (B, T) of 0/1 -> (B,) the number of separate runs of ones in each row."""
    rises = (mask[:, 1:] > mask[:, :-1]).sum(dim=1)
    return rises + mask[:, 0]
