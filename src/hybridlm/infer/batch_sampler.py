"""Every row an engine step samples, at once: the batched twin of `sampler.next_token`.

`BatchSampler.sample` takes the logits (R, V) of the R requests that pick a token in a step
and their SamplingParams, turns the parameters into per-row tensors (one host-to-device
copy), and computes all tokens, and the logprobs of the rows that asked for them, on the
device; then reads everything back with ONE `.tolist()`. A step of R rows therefore waits
on the device once, however many rows it samples, instead of once per row.

Penalties read per-row token counts kept on the device for the pool rows (`counts`,
`prompt_seen`), updated by the step that samples each token, so no history is copied from
the host. Draws use the exponential race of `sampler.raced`: a row with a generator of its
own (a seeded request, or one given a generator) draws its noise from it (one (V,) draw per
token, as the reference does), so a seeded request's tokens do not depend on what else is
in the batch; the other rows share one generator.

The arithmetic is that of `sampler` (the reference twin), on rows: masks and penalised
logits are equal bit for bit (tests/infer/test_batch_sampler.py).

Glossary: R rows sampled this step, B pool rows (max_batch), V vocab, N top logprobs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from hybridlm.infer.sampler import NAN_LOGITS, inverse_temperature, raced
from hybridlm.infer.sampling_params import SamplingParams


@dataclass
class TokenLogprob:
    """A generated token's log-probability under the model's raw logits (float32
    log_softmax, before penalties, temperature and narrowing) and the `top` most likely
    (token id, log-probability) pairs, most likely first."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass
class RowKnobs:
    """Each row's sampling parameters as (R,) tensors on the device."""

    inverse_temperature: torch.Tensor  # float32; unused for greedy rows
    greedy: torch.Tensor  # bool
    top_k: torch.Tensor  # long, V when off
    top_p: torch.Tensor  # float32, 1.0 when off
    min_p: torch.Tensor  # float32, 0.0 when off
    repetition: torch.Tensor  # float32, 1.0 when off
    presence: torch.Tensor  # float32
    frequency: torch.Tensor  # float32

    @classmethod
    def of(cls, params: Sequence[SamplingParams], vocab: int, device: torch.device
           ) -> RowKnobs:
        table = host_to_device([
            [inverse_temperature(p), float(p.greedy), min(p.top_k or vocab, vocab), p.top_p,
             p.min_p, p.repetition_penalty, p.presence_penalty, p.frequency_penalty]
            for p in params], torch.float32, device)  # (R, 8); top_k < 2**24 is exact
        inv_t, greedy, top_k, top_p, min_p, rep, pres, freq = table.unbind(dim=1)
        return cls(inv_t, greedy.bool(), top_k.long(), top_p, min_p, rep, pres, freq)


def host_to_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A tensor of host values on the device without waiting for it: on CUDA a pinned
    buffer copied asynchronously (a pageable copy would wait for the queued kernels)."""
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype, device=device)
    return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)


def has_penalties(params: SamplingParams) -> bool:
    return (params.repetition_penalty != 1.0 or params.presence_penalty != 0.0
            or params.frequency_penalty != 0.0)


def penalised_rows(logits: torch.Tensor, knobs: RowKnobs, counts: torch.Tensor,
                   prompt_seen: torch.Tensor) -> torch.Tensor:
    """logits (R, V) float32 with each row's penalties; counts (R, V) float32: times each
    token was generated; prompt_seen (R, V) bool: in the prompt. Rows whose penalties are
    off come back unchanged (x / 1, x * 1 and x - 0 are exact)."""
    rep = knobs.repetition[:, None]  # (R, 1)
    seen = prompt_seen | (counts > 0)  # (R, V)
    logits = torch.where(seen, torch.where(logits > 0, logits / rep, logits * rep), logits)
    return (logits - knobs.frequency[:, None] * counts
            - knobs.presence[:, None] * (counts > 0).to(logits.dtype))


def top_k_masked(logits: torch.Tensor, top_k: torch.Tensor, k_max: int) -> torch.Tensor:
    """logits (R, V) with every token below the row's k-th largest at -inf; top_k (R,) long
    (V: off); k_max: the largest k of a row that is on (a top-k of k_max, not a sort)."""
    vocab = logits.shape[-1]
    best = logits.topk(k_max, dim=-1).values  # (R, k_max), descending
    kth = best.gather(1, (top_k.clamp(max=k_max) - 1)[:, None])  # (R, 1)
    kth = torch.where(top_k[:, None] < vocab, kth, float("-inf"))
    return logits.masked_fill(logits < kth, float("-inf"))


def min_p_masked(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """logits (R, V), best at 0, with tokens below min_p * p_max at -inf; min_p 0 keeps all
    (log 0 = -inf)."""
    return logits.masked_fill(logits < min_p.log()[:, None], float("-inf"))


def top_p_masked(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """logits (R, V) with the tokens outside each row's top_p nucleus at -inf; rows with
    top_p 1.0 are left alone (rounding in the cumulative sum could otherwise drop tail
    tokens the reference keeps). Sorts after top-k / min-p, as the reference does: the
    tokens they dropped tie at -inf, which makes the sort cheap on the CPU."""
    ordered, order = torch.sort(logits, dim=-1, descending=True, stable=True)  # (R, V)
    probs = ordered.softmax(dim=-1)
    drop = (probs.cumsum(dim=-1) - probs >= top_p[:, None]) & (top_p < 1.0)[:, None]
    drop = torch.zeros_like(drop).scatter(1, order, drop)  # back to vocab order
    return logits.masked_fill(drop, float("-inf"))


def narrowed_batch(logits: torch.Tensor, knobs: RowKnobs, params: Sequence[SamplingParams]
                   ) -> torch.Tensor:
    """logits (R, V) float32 -> each row as `sampler.narrowed` gives it. params: the rows'
    SamplingParams, read on the host only to skip the masks no row uses."""
    vocab = logits.shape[-1]
    logits = (logits - logits.amax(dim=-1, keepdim=True)) * knobs.inverse_temperature[:, None]
    k_on = [p.top_k for p in params if p.top_k is not None and p.top_k < vocab]
    if k_on:
        logits = top_k_masked(logits, knobs.top_k, max(k_on))
    if any(p.min_p > 0 for p in params):
        logits = min_p_masked(logits, knobs.min_p)
    if any(p.top_p < 1.0 for p in params):
        logits = top_p_masked(logits, knobs.top_p)
    return logits


def logprob_rows(logits: torch.Tensor, tokens: torch.Tensor, top: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Raw logits (R', V) and the tokens (R',) picked -> their float32 log-probabilities
    (R',), and the `top` best ids (R', N) and log-probabilities (R', N)."""
    logprobs = logits.float().log_softmax(dim=-1)  # (R', V)
    picked = logprobs.gather(1, tokens[:, None])[:, 0]  # (R',)
    best = logprobs.topk(top, dim=-1)
    return picked, best.indices, best.values


class BatchSampler:
    """The sampling state of an engine's B pool rows and the batched draw.

    A row's counts are emptied when a request with penalties takes it (`admit`) and grow by
    one per token the step samples; rows of requests without penalties are never read. The
    count buffers (5 bytes per row and vocabulary entry) are allocated when the first
    request with penalties arrives."""

    def __init__(self, max_batch: int, vocab: int, device: torch.device) -> None:
        self.max_batch, self.vocab, self.device = max_batch, vocab, device
        self.counts: torch.Tensor | None = None  # (B, V) float32: times each was generated
        self.prompt_seen: torch.Tensor | None = None  # (B, V) bool: in the prompt
        self.generator = torch.Generator(device=device)  # the noise of rows without their own
        self.generator.seed()

    def admit(self, row: int, params: SamplingParams, prompt: torch.Tensor) -> None:
        """A request with `params` and prompt (P,) long takes pool row `row`."""
        if has_penalties(params):
            if self.counts is None:
                shape = (self.max_batch, self.vocab)
                self.counts = torch.zeros(shape, device=self.device)
                self.prompt_seen = torch.zeros(shape, dtype=torch.bool, device=self.device)
            self.counts[row].zero_()
            self.prompt_seen[row].zero_()
            self.prompt_seen[row, prompt] = True

    def sample(self, logits: torch.Tensor, rows: Sequence[int],
               params: Sequence[SamplingParams],
               generators: Sequence[torch.Generator | None]
               ) -> list[tuple[int, TokenLogprob | None]]:
        """logits (R, V) of pool rows `rows`, each row's SamplingParams and generator (None:
        it draws from the sampler's shared one) -> each row's token and, where
        params.logprobs is set, its TokenLogprob. One read from the device. ValueError when
        a row's logits hold NaN (the reference's check, read back with the tokens). A row
        with penalties must have been `admit`ted (its counts start then)."""
        picks = self._read(logits, self.tokens(logits, rows, params, generators), params)
        if any(token < 0 for token, _ in picks):
            raise ValueError(NAN_LOGITS)
        return picks

    def tokens(self, logits: torch.Tensor, rows: Sequence[int],
               params: Sequence[SamplingParams],
               generators: Sequence[torch.Generator | None]) -> torch.Tensor:
        """As `sample`, but the tokens (R,) long stay on the device, unread; -1 for a row
        whose logits hold NaN."""
        nan_rows = torch.isnan(logits).any(dim=-1)  # (R,)
        logits = logits.float()
        penalties = any(has_penalties(p) for p in params)
        needs_draw = not all(p.greedy for p in params)
        knobs = (RowKnobs.of(params, self.vocab, self.device) if penalties or needs_draw
                 else None)
        index = host_to_device(list(rows), torch.long, self.device) if penalties else None
        if penalties:
            logits = penalised_rows(logits, knobs, self.counts[index], self.prompt_seen[index])
        tokens = logits.argmax(dim=-1)  # (R,) the greedy rows' picks
        if needs_draw:
            noise = self._noise(logits.shape, params, generators)
            drawn = raced(narrowed_batch(logits, knobs, params), noise)
            tokens = torch.where(knobs.greedy, tokens, drawn)
        if penalties:  # the rows of requests without penalties are never read: skip them
            self.counts.index_put_((index, tokens), torch.ones_like(tokens, dtype=torch.float32),
                                   accumulate=True)
        return torch.where(nan_rows, -1, tokens)

    def _noise(self, shape: torch.Size, params: Sequence[SamplingParams],
               generators: Sequence[torch.Generator | None]) -> torch.Tensor:
        """Exp(1) noise (R, V) of the rows that draw: a row with a generator draws from it
        (rows sharing one draw in turn, in row order), the others from the shared one in one
        call (greedy rows: ones, unread)."""
        unseeded = [i for i, (p, generator) in enumerate(zip(params, generators, strict=True))
                    if generator is None and not p.greedy]
        if len(unseeded) == len(params):
            return torch.empty(shape, device=self.device).exponential_(generator=self.generator)
        noise = torch.ones(shape, device=self.device)
        if unseeded:
            noise[host_to_device(unseeded, torch.long, self.device)] = torch.empty(
                len(unseeded), shape[-1], device=self.device).exponential_(
                    generator=self.generator)
        for i, (p, generator) in enumerate(zip(params, generators, strict=True)):
            if generator is not None and not p.greedy:
                noise[i].exponential_(generator=generator)
        return noise

    def _read(self, raw: torch.Tensor, tokens: torch.Tensor,
              params: Sequence[SamplingParams]) -> list[tuple[int, TokenLogprob | None]]:
        """Tokens (R,) and the asked-for logprobs, packed as float64 (exact for ids below
        2**53 and for float32 values) and read with one `.tolist()`."""
        asking = [i for i, p in enumerate(params) if p.logprobs is not None]
        if not asking:
            return [(token, None) for token in tokens.tolist()]
        top = max(params[i].logprobs for i in asking)
        which = host_to_device(asking, torch.long, self.device)
        # clamped: a NaN row's -1 must not index the vocab (its ValueError comes after)
        picked, best_ids, best_logprobs = logprob_rows(raw[which], tokens[which].clamp(min=0),
                                                       top)
        values = torch.cat([tokens.double(), picked.double(), best_ids.double().flatten(),
                            best_logprobs.double().flatten()]).tolist()
        rows = len(params)
        out: list[tuple[int, TokenLogprob | None]] = [(int(t), None) for t in values[:rows]]
        picked_at, ids_at = rows, rows + len(asking)
        logprobs_at = ids_at + len(asking) * top
        for j, i in enumerate(asking):
            n = params[i].logprobs
            ids = values[ids_at + j * top:ids_at + j * top + n]
            logprobs = values[logprobs_at + j * top:logprobs_at + j * top + n]
            out[i] = (out[i][0], TokenLogprob(out[i][0], values[picked_at + j],
                                              [(int(t), v) for t, v in zip(ids, logprobs,
                                                                             strict=True)]))
        return out
