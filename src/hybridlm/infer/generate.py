"""Autoregressive generation with the model's cache: one prefill, then one token per step.

Glossary: B batch, T0 prompt length, V vocab.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def sample_next(
    logits: torch.Tensor,
    do_sample: bool,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """logits (B, V) -> next token ids (B,). Greedy when do_sample is False."""
    if torch.isnan(logits).any():  # greedy would pick an arbitrary token, sampling fails
        raise ValueError("the model's logits are NaN, so there is no next token to pick: its "
                         "weights hold NaN or infinities, or its activations overflowed")
    if not do_sample:
        return logits.argmax(dim=-1)
    logits = logits.float()
    # Shift the best logit to 0 before dividing: a tiny temperature then sends the others
    # to -inf (greedy in the limit) instead of overflowing every logit to +-inf (NaN).
    # A temperature below float32's smallest normal would become 0 in the division (0/0).
    temperature = max(temperature, torch.finfo(torch.float32).tiny)
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        sorted_logits, sorted_idx = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the mass BEFORE it already reaches top_p (keeps at least one).
        drop = probs.cumsum(dim=-1) - probs >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, sorted_idx, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


class StopStrings:
    """Finds stop strings in the text each row has generated (prompts are never searched).

    Only the last `window` tokens are decoded at each step: a string of n UTF-8 bytes that
    the newest token completed lies within the last n tokens (every token is >= 1 byte)."""

    def __init__(self, strings: Sequence[str], tokenizer) -> None:
        if isinstance(strings, str) or not strings or not all(
                isinstance(x, str) and x for x in strings):
            raise ValueError(f"stop_strings={strings!r} must be a non-empty list of non-empty "
                             "strings")
        if tokenizer is None:
            raise ValueError("stop_strings needs the tokenizer that decodes the tokens")
        self.strings = tuple(strings)
        self.tokenizer = tokenizer
        self.window = max(len(x.encode("utf-8")) for x in self.strings)

    def found(self, new_tokens: torch.Tensor) -> torch.Tensor:
        """new_tokens (B, n) generated so far -> (B,) bool: a stop string ends in them."""
        tails = new_tokens[:, -self.window:].tolist()
        texts = [self.tokenizer.decode(row) for row in tails]
        hits = [any(x in text for x in self.strings) for text in texts]
        return torch.tensor(hits, dtype=torch.bool, device=new_tokens.device)


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
    """input_ids (B, T0) -> (B, T0 + n), n <= max_new_tokens (fewer if all hit eos).

    Prompts of different lengths, two ways; each row gets the tokens it gets alone (greedy):
    - a list of id lists -> a list of id lists: each prompt followed by its own new tokens,
      ending at its eos / stop-string token (no padding), as `generate` of that prompt alone.
    - input_ids (B, T) with attention_mask (B, T) (1 = token, 0 = padding; rows left- or
      right-padded, as in HF transformers) -> (B, T + n): input_ids as given, then the new
      tokens (rows that finished padded with eos_token_id).
    Either way the prompts are right-padded into one prefill whose rows stop at their own
    lengths (`HybridLM.forward`'s input_lengths), then every row decodes one token per step
    at its own position.

    stop_strings (with the `tokenizer`, as in HF transformers): a row also stops once its
    generated text contains one of them; the output keeps the tokens up to the one that
    completed it (cut the text with `cut_at_stop_strings`). Stopped rows are padded with
    eos_token_id, which is then required."""
    check_sampling_args(max_new_tokens, temperature, top_k, top_p)
    stop = None
    if stop_strings is not None:
        stop = StopStrings(stop_strings, tokenizer)
        if eos_token_id is None:
            raise ValueError("stop_strings needs eos_token_id: it pads the rows that stopped")
    ragged = not isinstance(input_ids, torch.Tensor) or attention_mask is not None
    prompts = _prompt_lists(input_ids, attention_mask) if ragged else None
    if not ragged and input_ids.dim() == 1:
        input_ids = input_ids.unsqueeze(0)
    longest = max(map(len, prompts)) if ragged else input_ids.shape[1]
    limit = model.config.max_position_embeddings
    total = longest + max_new_tokens
    if total > limit:
        raise ValueError(
            f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) = {total}"
            f" exceeds max_position_embeddings={limit}"
        )
    was_training = model.training
    model.eval()
    try:
        batch = len(prompts) if ragged else input_ids.shape[0]
        cache = model.new_cache(batch, total)
        if ragged:
            logits = _prefill_right_padded(model, prompts, cache)
        else:
            logits = model(input_ids, cache=cache).logits[:, -1]  # prefill: (B, V)
        new, done_at = _decode(model, cache, logits, max_new_tokens, stop, eos_token_id,
                               lambda lg: sample_next(lg, do_sample, temperature, top_k, top_p,
                                                      generator))
    finally:
        model.train(was_training)
    if not ragged:
        return torch.cat([input_ids, new], dim=1)
    if isinstance(input_ids, torch.Tensor):
        return torch.cat([input_ids, new.to(input_ids.device)], dim=1)
    return [prompt + _until_done(row, end) for prompt, row, end in
            zip(prompts, new.tolist(), done_at.tolist(), strict=True)]


def _decode(model, cache, logits: torch.Tensor, max_new_tokens: int, stop: StopStrings | None,
            eos_token_id: int | None, pick) -> tuple[torch.Tensor, torch.Tensor]:
    """The decoding loop after the prefill's last logits (B, V) -> the new tokens (B, n) and
    the step at which each row finished (B,), -1 where it did not."""
    batch = logits.shape[0]
    finished = torch.zeros(batch, dtype=torch.bool, device=logits.device)
    done_at = torch.full((batch,), -1, dtype=torch.long, device=logits.device)
    out = []
    for step in range(max_new_tokens):
        nxt = pick(logits)
        if eos_token_id is not None:
            nxt = nxt.masked_fill(finished, eos_token_id)
            finished |= nxt == eos_token_id
        out.append(nxt[:, None])
        if stop is not None:  # out: the generated tokens, (B, 1) each
            finished |= stop.found(torch.cat(out[-stop.window:], dim=1))
        done_at = done_at.masked_fill(finished & (done_at < 0), step)
        if eos_token_id is not None and bool(finished.all()):
            break
        logits = model(nxt[:, None], cache=cache).logits[:, -1]
    new = torch.cat(out, dim=1) if out else logits.new_zeros(batch, 0, dtype=torch.long)
    return new, done_at


def _prefill_right_padded(model, prompts: list[list[int]], cache) -> torch.Tensor:
    """Run prompts of different lengths as one right-padded batch into `cache`; each row
    stops at its own length. Returns the logits after each prompt's last token (B, V)."""
    device = cache.lengths.device
    lengths = torch.tensor([len(p) for p in prompts], dtype=torch.long, device=device)
    ids = torch.zeros(len(prompts), int(lengths.max()), dtype=torch.long, device=device)
    for row, prompt in enumerate(prompts):  # padding id 0: any id works, it is never read
        ids[row, : len(prompt)] = torch.tensor(prompt, dtype=torch.long)
    logits = model(ids, cache=cache, input_lengths=lengths).logits  # (B, T, V)
    return logits[torch.arange(len(prompts), device=device), lengths - 1]


def _prompt_lists(input_ids, attention_mask: torch.Tensor | None) -> list[list[int]]:
    """Ragged prompts as lists of ids: a list of id lists as given, or the rows of input_ids
    (B, T) without the positions attention_mask (B, T) marks 0 (left or right padding)."""
    if attention_mask is None:
        prompts = [list(map(int, p)) for p in input_ids]
    else:
        prompts = _unpad(input_ids, attention_mask)
    if not prompts:
        raise ValueError("generate needs at least one prompt; got an empty list")
    for i, prompt in enumerate(prompts):
        if not prompt:
            raise ValueError(f"prompt {i} is empty: every prompt needs at least one token")
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


def _until_done(tokens: list[int], done_at: int) -> list[int]:
    """A row's new tokens up to the one that finished it (all of them if none did)."""
    return tokens if done_at < 0 else tokens[: done_at + 1]
