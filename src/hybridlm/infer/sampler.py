"""One request's next token from its logits: penalties, temperature, top-k / top-p /
min-p, then a draw from its own generator (or the argmax when greedy).

This is the pure-torch reference twin of `batch_sampler`, which samples every row of an
engine step at once; both do the same float32 arithmetic in the same order (a reciprocal
temperature multiplied in, thresholds as float32 tensors, stable sorts), so their masks and
penalised logits are equal bit for bit and a seeded request draws the same tokens in both.

Draws use the exponential race (Gumbel-max): token = argmax(logits - log E) with E ~ Exp(1)
drawn for each vocabulary entry, which picks token i with probability softmax(logits)_i.

Glossary: V vocab, N top alternatives.
"""

from __future__ import annotations

import torch

from hybridlm.infer.sampling_params import SamplingParams

TINY = torch.finfo(torch.float32).tiny
NAN_LOGITS = ("the model's logits are NaN, so there is no next token to pick: its weights "
              "hold NaN or infinities, or its activations overflowed")


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


def inverse_temperature(params: SamplingParams) -> float:
    # Floored at float32's tiny: a tiny temperature then sends every logit but the best
    # (shifted to 0 first) to -inf instead of overflowing them all to +-inf (NaN).
    return 1.0 / max(params.temperature, TINY)


def narrowed(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """logits (V,) float32 scaled by the temperature, with the tokens top-k / top-p / min-p
    drop at -inf (the most likely token always stays)."""
    scale = torch.tensor(inverse_temperature(params), dtype=torch.float32,
                         device=logits.device)
    logits = (logits - logits.max()) * scale
    if params.top_k is not None and params.top_k < logits.shape[0]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.min_p > 0:  # p < min_p * p_max  <=>  logit < log(min_p) (the best logit is 0)
        floor = torch.tensor(params.min_p, dtype=torch.float32, device=logits.device).log()
        logits = logits.masked_fill(logits < floor, float("-inf"))
    if params.top_p < 1.0:
        ordered, order = torch.sort(logits, descending=True, stable=True)
        probs = ordered.softmax(dim=-1)
        top_p = torch.tensor(params.top_p, dtype=torch.float32, device=logits.device)
        drop = probs.cumsum(dim=-1) - probs >= top_p  # mass before it reaches top_p
        logits = logits.index_fill(0, order[drop], float("-inf"))
    return logits


def raced(logits: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The exponential race: logits (..., V) with -inf at dropped tokens, noise (..., V)
    ~ Exp(1) -> the winning token ids (...)."""
    # Clamped: an Exp(1) draw of exactly 0 would give +inf, and -inf + inf = NaN.
    return (logits - noise.clamp(min=TINY).log()).argmax(dim=-1)


def next_token(logits: torch.Tensor, params: SamplingParams, prompt: torch.Tensor,
               output: torch.Tensor, generator: torch.Generator | None) -> int:
    """logits (V,) of one request -> its next token id."""
    if torch.isnan(logits).any():  # greedy would pick an arbitrary token, sampling fails
        raise ValueError(NAN_LOGITS)
    logits = penalised(logits.float(), params, prompt, output)
    if params.greedy:
        return int(logits.argmax())
    noise = torch.empty_like(logits).exponential_(generator=generator)  # (V,)
    return int(raced(narrowed(logits, params), noise))


def token_logprobs(logits: torch.Tensor, token: int, top: int
                   ) -> tuple[float, list[tuple[int, float]]]:
    """logits (V,) as the model gave them (before penalties and temperature) -> the float32
    log-probability of `token` and the `top` most likely (token id, log-probability)."""
    logprobs = logits.float().log_softmax(dim=-1)  # (V,)
    best = logprobs.topk(top) if top else None
    pairs = list(zip(best.indices.tolist(), best.values.tolist(), strict=True)) if best else []
    return float(logprobs[token]), pairs
