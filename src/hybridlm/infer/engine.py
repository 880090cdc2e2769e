"""Continuous batching: requests join a fixed pool of cache rows between decode steps and
leave when finished, so a long generation never holds back a short one.

Each `step`: waiting requests take free rows; one prefill forward feeds the next chunk (at
most `prefill_chunk` tokens) of every prompt not yet in the cache, right-padded, each row
advancing by its own chunk; then one decode forward feeds the last token of every row that
is generating. Each forward runs over the span of pool rows from the lowest to the highest
row it feeds, with `input_lengths` 0 for the rows in between that it does not feed, so those
do not move. The rows sampled in a step (prefill and decode alike) are queued by `_sample`
and drawn together at the end of the step by `BatchSampler` (one read from the device per
step), each with its own parameters; a seeded request (or one given a generator) draws from
its own torch.Generator, the others from one the engine shares among them. Under
`hybridlm.ops.set_impl("reference")` each request samples alone with `sampler.next_token`,
the reference twin.

A request that waits longer than `queue_timeout` seconds for a free row ends with
finish_reason "timeout" and no tokens.

Glossary: B pool rows (max_batch), T tokens fed per row, V vocab.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Iterator, Sequence

import torch

from hybridlm.infer.batch_sampler import BatchSampler, TokenLogprob
from hybridlm.infer.decode_graphs import DecodeGraphs
from hybridlm.infer.request import Request, RequestOutput, StreamDelta
from hybridlm.infer.sampler import next_token, token_logprobs
from hybridlm.infer.sampling_params import SamplingParams
from hybridlm.infer.slots import SlotPool
from hybridlm.ops.dispatch import current_impl


class Engine:
    """Serves requests on `model` (put in eval mode) with a pool of max_batch cache rows of
    max_len tokens each (None: max_position_embeddings; a smaller pool for callers that know
    their requests' lengths, as `HybridLM.generate`). tokenizer (anything with
    `decode(ids) -> str`): needed for text, streaming text and stop strings.

    cuda_graphs (None: on for a model on a CUDA device, unless `hybridlm.ops` is forced to
    the reference): decode steps replay CUDA graphs captured per batch-size and key-window
    bucket (infer/decode_graphs.py). compile_decode: those steps are also compiled
    (`torch.compile`, fullgraph), which costs a compilation on first use.

    queue_timeout (seconds, None: no limit): how long a request may wait for a free row."""

    def __init__(self, model, tokenizer=None, max_batch: int = 8,
                 prefill_chunk: int = 512, max_len: int | None = None,
                 cuda_graphs: bool | None = None, compile_decode: bool = False,
                 queue_timeout: float | None = None) -> None:
        if isinstance(prefill_chunk, bool) or not isinstance(prefill_chunk, int) or (
                prefill_chunk < 1):
            raise ValueError(f"prefill_chunk={prefill_chunk!r} must be an int >= 1")
        if queue_timeout is not None and (
                isinstance(queue_timeout, bool) or not isinstance(queue_timeout, int | float)
                or not math.isfinite(queue_timeout) or queue_timeout <= 0):
            raise ValueError(f"queue_timeout={queue_timeout!r} must be a finite number of "
                             "seconds > 0 (or None)")
        if cuda_graphs not in (None, True, False):
            raise ValueError(f"cuda_graphs={cuda_graphs!r} must be True, False or None (on "
                             "when the model is on a CUDA device)")
        model.check_causal()
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.prefill_chunk = prefill_chunk
        self.pool = SlotPool(model, max_batch, max_len)
        self.max_batch = max_batch
        self.device = self.pool.cache.lengths.device
        self.queue_timeout = queue_timeout
        self.sampler = BatchSampler(max_batch, model.config.vocab_size, self.device)
        self._queued: list[tuple[Request, torch.Tensor]] = []  # rows to sample this step
        if cuda_graphs is None:  # the reference switch of hybridlm.ops also turns graphs off
            cuda_graphs = self.device.type == "cuda" and current_impl() == "auto"
        # Decode steps run as captured CUDA graphs (see infer/decode_graphs.py), else eagerly.
        if compile_decode and not cuda_graphs:
            raise ValueError("compile_decode=True compiles the CUDA-graph decode step: it needs "
                             "cuda_graphs (a model on a CUDA device)")
        self.graphs = (DecodeGraphs(model, self.pool, capture=True, compile=compile_decode)
                       if cuda_graphs else None)
        self.waiting: deque[Request] = deque()
        self.running: dict[int, Request] = {}  # row -> request
        self.requests: dict[int, Request] = {}
        self._next_id = 0

    # --- requests -------------------------------------------------------------------------
    def add_request(self, prompt_ids: Sequence[int], params: SamplingParams | None = None,
                    generator: torch.Generator | None = None) -> int:
        """Queue a prompt; returns its request id. ValueError (the engine goes on serving the
        others) for an empty prompt, ids outside the vocab, stop strings without a
        tokenizer, or prompt + max_tokens (1 when None) beyond the pool's rows.

        generator: the torch.Generator (on the engine's device) the request draws its
        samples from, instead of one seeded from params.seed (give one or the other). It is
        used as is, not copied: requests sharing one draw in turn from one stream."""
        params = params if params is not None else SamplingParams()
        prompt = self._checked_prompt(prompt_ids)
        limit, wanted = self.pool.capacity, params.max_tokens or 1
        if len(prompt) + wanted > limit:
            what = ("max_position_embeddings" if limit == self.model.config.max_position_embeddings
                    else "the engine's max_len")
            raise ValueError(f"prompt ({len(prompt)} tokens) + max_tokens ({wanted}) = "
                             f"{len(prompt) + wanted} exceeds {what}={limit}")
        if params.stop and self.tokenizer is None:
            raise ValueError(f"stop={params.stop!r} needs the engine's tokenizer to read the "
                             "text; build Engine(model, tokenizer)")
        self._check_generator(generator, params)
        request = Request(self._next_id, prompt, params, self.tokenizer, self.device,
                          generator=generator)
        self._next_id += 1
        self.requests[request.id] = request
        self.waiting.append(request)
        return request.id

    def _checked_prompt(self, prompt_ids: Sequence[int]) -> list[int]:
        prompt = [int(t) for t in prompt_ids]
        if not prompt:
            raise ValueError("prompt_ids is empty: a request needs at least one token")
        vocab = self.model.config.vocab_size
        bad = [t for t in prompt if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt_ids holds token id {bad[0]}, outside [0, "
                             f"vocab_size={vocab})")
        return prompt

    def _check_generator(self, generator: torch.Generator | None,
                         params: SamplingParams) -> None:
        if generator is None:
            return
        if not isinstance(generator, torch.Generator):
            raise ValueError(f"generator={generator!r} must be a torch.Generator or None")
        if params.seed is not None:
            raise ValueError(f"generator and seed={params.seed} both given: a request draws "
                             "from one of them; pass one")
        if generator.device != self.device:
            raise ValueError(f"generator is on {generator.device} but the engine samples on "
                             f"{self.device}; make it with torch.Generator(device=...)")

    def output(self, request_id: int) -> RequestOutput:
        return self.requests[request_id].output()

    def cancel(self, request_id: int) -> None:
        """Forget a request, finished or not: a running one frees its cache row at once, a
        waiting one leaves the queue; its output is gone. Unknown ids are ignored, so a
        caller may cancel whatever it still holds without asking first."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return
        if request.row is not None and self.running.get(request.row) is request:
            del self.running[request.row]
            self.pool.release(request.row)
        elif request in self.waiting:
            self.waiting.remove(request)

    def warm_up(self) -> int:
        """Capture the CUDA graph of every decode bucket now, so no request waits for a
        capture later (a no-op without graphs); returns the number captured."""
        return self.graphs.capture_all() if self.graphs is not None else 0

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # --- the scheduler --------------------------------------------------------------------
    @torch.no_grad()
    def step(self) -> list[RequestOutput]:
        """One scheduler iteration; returns the requests that finished in it."""
        self._admit()
        decoding = [r for r in self.running.values() if not r.prefilling]
        prefilling = [r for r in self.running.values() if r.prefilling]
        if prefilling:
            self._prefill(prefilling)
        if decoding:
            self._decode(decoding)
        self._draw_queued()
        done = [r for r in prefilling + decoding if r.finished]
        for request in done:
            del self.running[request.row]
            self.pool.release(request.row)
        return [r.output() for r in done + self._expire()]

    def _admit(self) -> None:
        while self.waiting:
            row = self.pool.take()
            if row is None:
                return
            request = self.waiting.popleft()
            request.row = row
            self.running[row] = request
            self.sampler.admit(row, request.params, request.prompt_tensor)

    def _expire(self) -> list[Request]:
        """End the waiting requests older than queue_timeout (the queue is in arrival
        order, so they are at its front)."""
        expired = []
        if self.queue_timeout is not None:
            now = time.monotonic()
            while self.waiting and now - self.waiting[0].queued_at > self.queue_timeout:
                request = self.waiting.popleft()
                request.expire()
                expired.append(request)
        return expired

    def _prefill(self, requests: list[Request]) -> None:
        """Feed each request's next prompt chunk; those whose prompt is then complete
        sample their first token from the logits at its last token."""
        chunks = {r.row: r.prompt[r.fed:r.fed + self.prefill_chunk] for r in requests}
        logits, lo = self._forward(chunks)  # (B', T, V)
        for request in requests:
            request.fed += len(chunks[request.row])
            if not request.prefilling:
                self._sample(request, logits[request.row - lo, len(chunks[request.row]) - 1])

    def _decode(self, requests: list[Request]) -> None:
        """Feed every generating row its last token: one forward of (B, 1), or one replay
        of a CUDA graph."""
        if self.graphs is not None:
            # A row holds its prompt and every token but the one fed now; +1 for that one.
            window = max(len(r.prompt) + len(r.tokens) for r in requests)
            logits = self.graphs.decode({r.row: r.tokens[-1] for r in requests}, window)
            for request in requests:  # logits (R, V) of rows 0 .. R-1
                self._sample(request, logits[request.row])
            return
        logits, lo = self._forward({r.row: r.tokens[-1:] for r in requests})  # (B', 1, V)
        for request in requests:
            self._sample(request, logits[request.row - lo, 0])

    def _forward(self, feed: dict[int, list[int]]) -> tuple[torch.Tensor, int]:
        """Feed row -> tokens (right-padded) over the span of rows lo .. hi-1 that holds them;
        -> the logits (hi - lo, T, V) and lo."""
        lo, hi = min(feed), max(feed) + 1
        width = max(map(len, feed.values()))
        # Built on the host, then one copy to the device (not one per row).
        rows = [feed.get(row, []) for row in range(lo, hi)]
        padded = [tokens + [0] * (width - len(tokens)) for tokens in rows]  # id 0: never read
        ids = torch.tensor(padded, dtype=torch.long).to(self.device, non_blocking=True)
        lengths = torch.tensor([len(t) for t in rows], dtype=torch.long).to(self.device,
                                                                            non_blocking=True)
        view = self.pool.view(lo, hi)
        logits = self.model(ids, cache=view, input_lengths=lengths).logits
        self.pool.store(view, lo)
        return logits, lo

    def _sample(self, request: Request, logits: torch.Tensor) -> None:
        """Queue the request's logits (V,) for the draw at the end of the step."""
        self._queued.append((request, logits))

    def _draw_queued(self) -> None:
        """Sample every queued row: all at once, or one by one with the reference."""
        queued, self._queued = self._queued, []
        if not queued:
            return
        requests = [r for r, _ in queued]
        if current_impl() == "reference":
            picks = [self._reference_pick(r, logits) for r, logits in queued]
        else:
            picks = self.sampler.sample(
                torch.stack([logits for _, logits in queued]),  # (R, V)
                [r.row for r in requests], [r.params for r in requests],
                [r.generator if r.own_generator else None for r in requests])
        for request, (token, logprob) in zip(requests, picks, strict=True):
            # Sampled once the prompt and every earlier token are in the row; the new token
            # will be fed at the next slot: none left means it is the last.
            cached = len(request.prompt) + len(request.tokens)
            request.accept(token, context_full=cached + 1 >= self.pool.capacity,
                           logprob=logprob)

    @staticmethod
    def _reference_pick(request: Request, logits: torch.Tensor):
        token = next_token(logits, request.params, request.prompt_tensor,
                           request.output_tensor(), request.generator)
        if request.params.logprobs is None:
            return token, None
        return token, TokenLogprob(token, *token_logprobs(logits, token,
                                                          request.params.logprobs))

    # --- conveniences ---------------------------------------------------------------------
    def add_choices(self, prompt_ids: Sequence[int], params: SamplingParams, n: int
                    ) -> list[int]:
        """Queue n independent choices of one prompt (`SamplingParams.for_choices`: a seeded
        request's choice i uses seed + i); their request ids. Checked before any is queued,
        so a ValueError leaves none behind."""
        choices = params.for_choices(n)
        self._checked_prompt(prompt_ids)
        first = self.add_request(prompt_ids, choices[0])
        return [first] + [self.add_request(prompt_ids, p) for p in choices[1:]]

    def generate(self, prompts: Sequence[Sequence[int]],
                 params: SamplingParams | Sequence[SamplingParams] | None = None
                 ) -> list[RequestOutput]:
        """Run prompts to completion (with whatever else is queued); their outputs in order."""
        if params is None or isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"params holds {len(params)} SamplingParams for {len(prompts)} "
                             "prompts; give one, or one per prompt")
        ids = [self.add_request(p, sp) for p, sp in zip(prompts, params, strict=True)]
        while any(not self.requests[i].finished for i in ids):
            self.step()
        return [self.output(i) for i in ids]

    def stream(self, request_id: int) -> Iterator[StreamDelta]:
        """The request's deltas as they come, stepping the engine (and so every other
        request) whenever it has nothing new."""
        request = self.requests[request_id]
        while True:
            while request.deltas:
                delta = request.deltas.popleft()
                yield delta
                if delta.finished:
                    return
            if request.finished:
                return
            self.step()
