"""One request's next token from its logits: penalties, temperature, top-k / top-p /
min-p, then a draw from its own generator (or the argmax when greedy).

Glossary: V vocab.
"""

from __future__ import annotations

import torch

from hybridlm.infer.sampling_params import SamplingParams


def penalised(logits: torch.Tensor, params: SamplingParams, prompt: torch.Tensor,
              output: torch.Tensor) -> torch.Tensor:
    """logits (V,) float -> (V,) with the repetition, presence and frequency penalties of
    `params`; prompt (P,) and output (O,) long are the request's tokens so far."""
    if params.repetition_penalty != 1.0:
        seen = torch.cat([prompt, output]).unique()
        picked = logits[seen]
        logits = logits.index_copy(0, seen, torch.where(
            picked > 0, picked / params.repetition_penalty, picked * params.repetition_penalty))
    if output.numel() and (params.presence_penalty or params.frequency_penalty):
        counts = torch.bincount(output, minlength=logits.shape[0]).to(logits.dtype)  # (V,)
        logits = (logits - params.frequency_penalty * counts
                  - params.presence_penalty * (counts > 0).to(logits.dtype))
    return logits


def narrowed(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """logits (V,) scaled by the temperature, with the tokens top-k / top-p / min-p drop at
    -inf (the most likely token always stays)."""
    # Shift the best logit to 0 first: a tiny temperature then sends the others to -inf
    # instead of overflowing every logit to +-inf (NaN).
    temperature = max(params.temperature, torch.finfo(torch.float32).tiny)
    logits = (logits - logits.max()) / temperature
    if params.top_k is not None and params.top_k < logits.shape[0]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.min_p > 0:  # p < min_p * p_max  <=>  logit < log(min_p) (the best logit is 0)
        logits = logits.masked_fill(logits < torch.log(torch.tensor(params.min_p)),
                                    float("-inf"))
    if params.top_p < 1.0:
        ordered, order = torch.sort(logits, descending=True)
        probs = ordered.softmax(dim=-1)
        drop = probs.cumsum(dim=-1) - probs >= params.top_p  # mass before it reaches top_p
        logits = logits.index_fill(0, order[drop], float("-inf"))
    return logits


def next_token(logits: torch.Tensor, params: SamplingParams, prompt: torch.Tensor,
               output: torch.Tensor, generator: torch.Generator | None) -> int:
    """logits (V,) of one request -> its next token id."""
    if torch.isnan(logits).any():  # greedy would pick an arbitrary token, sampling fails
        raise ValueError("the model's logits are NaN, so there is no next token to pick: its "
                         "weights hold NaN or infinities, or its activations overflowed")
    logits = penalised(logits.float(), params, prompt, output)
    if params.greedy:
        return int(logits.argmax())
    probs = narrowed(logits, params).softmax(dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))
