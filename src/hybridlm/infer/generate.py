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
    input_ids: torch.Tensor,
    max_new_tokens: int,
    *,
    do_sample: bool = True,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | None = None,
    generator: torch.Generator | None = None,
    stop_strings: Sequence[str] | None = None,
    tokenizer=None,
) -> torch.Tensor:
    """input_ids (B, T0) -> (B, T0 + n), n <= max_new_tokens (fewer if all hit eos).

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
    if input_ids.dim() == 1:
        input_ids = input_ids.unsqueeze(0)
    limit = model.config.max_position_embeddings
    total = input_ids.shape[1] + max_new_tokens
    if total > limit:
        raise ValueError(
            f"prompt ({input_ids.shape[1]} tokens) + max_new_tokens ({max_new_tokens}) = {total}"
            f" exceeds max_position_embeddings={limit}"
        )
    was_training = model.training
    model.eval()
    try:
        cache = model.new_cache(input_ids.shape[0], total)
        logits = model(input_ids, cache=cache).logits[:, -1]  # prefill: (B, V)
        finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        out = [input_ids]
        for _ in range(max_new_tokens):
            nxt = sample_next(logits, do_sample, temperature, top_k, top_p, generator)
            if eos_token_id is not None:
                nxt = nxt.masked_fill(finished, eos_token_id)
                finished |= nxt == eos_token_id
            out.append(nxt[:, None])
            if stop is not None:  # out[1:]: the generated tokens, (B, 1) each
                finished |= stop.found(torch.cat(out[1:][-stop.window:], dim=1))
            if eos_token_id is not None and bool(finished.all()):
                break
            logits = model(nxt[:, None], cache=cache).logits[:, -1]
        return torch.cat(out, dim=1)
    finally:
        model.train(was_training)
