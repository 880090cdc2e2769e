"""Autoregressive generation with the model's cache: one prefill, then one token per step.

Glossary: B batch, T0 prompt length, V vocab.
"""

from __future__ import annotations

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
    if not do_sample:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
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


def _check_args(max_new_tokens: int, temperature: float, top_k: int | None,
                top_p: float | None) -> None:
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 0")
    if temperature <= 0:
        raise ValueError(f"temperature={temperature} must be > 0 (use do_sample=False for greedy)")
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
) -> torch.Tensor:
    """input_ids (B, T0) -> (B, T0 + n), n <= max_new_tokens (fewer if all hit eos)."""
    _check_args(max_new_tokens, temperature, top_k, top_p)
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
            if eos_token_id is not None and bool(finished.all()):
                break
            logits = model(nxt[:, None], cache=cache).logits[:, -1]
        return torch.cat(out, dim=1)
    finally:
        model.train(was_training)
