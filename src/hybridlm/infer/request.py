"""One request's state inside the engine, and what callers get back from it."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

import torch

from hybridlm.infer.batch_sampler import TokenLogprob
from hybridlm.infer.detokenize import IncrementalDetokenizer, StopText
from hybridlm.infer.sampling_params import SamplingParams


@dataclass
class RequestOutput:
    """A request's result so far. finish_reason: "length" (max_tokens), "stop" (a stop
    token id or string; neither is in token_ids / text), "context" (the cache is full),
    "timeout" (no free cache row within the engine's queue_timeout; nothing generated).
    logprobs: one per token id when the params asked for them, else None.
    stop_token_id: the stop token id that ended it (None otherwise), so a caller can tell
    which stop it was (the token that completed a stop string is in token_ids)."""

    request_id: int
    prompt_ids: list[int]
    token_ids: list[int]
    text: str | None
    finished: bool
    finish_reason: str | None
    stop_token_id: int | None = None
    logprobs: list[TokenLogprob] | None = None


@dataclass
class StreamDelta:
    """What one step added to a request: its new token (None when the step ended it on a
    stop token) with its logprobs when asked for, and the text safe to show."""

    token_id: int | None
    text: str
    finished: bool
    finish_reason: str | None
    stop_token_id: int | None = None
    logprob: TokenLogprob | None = None


@dataclass
class Request:
    id: int
    prompt: list[int]
    params: SamplingParams
    tokenizer: object | None
    device: torch.device
    row: int | None = None
    fed: int = 0  # prompt tokens already in the cache
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    deltas: deque = field(default_factory=deque)
    generator: torch.Generator | None = None  # None: one of its own, from params.seed
    stop_token_id: int | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)
    queued_at: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        # Draws from a generator of its own (seeded, or given by the caller), not from the
        # engine's shared one: its tokens then do not depend on the rest of the batch.
        self.own_generator = self.generator is not None or self.params.seed is not None
        if self.generator is None:
            self.generator = torch.Generator(device=self.device)
            if self.params.seed is not None:
                self.generator.manual_seed(self.params.seed)
            else:
                self.generator.seed()
        self.prompt_tensor = torch.tensor(self.prompt, dtype=torch.long, device=self.device)
        self.detok = IncrementalDetokenizer(self.tokenizer) if self.tokenizer else None
        self.stop_text = StopText(self.params.stop)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def prefilling(self) -> bool:
        return self.fed < len(self.prompt)

    def output_tensor(self) -> torch.Tensor:
        return torch.tensor(self.tokens, dtype=torch.long, device=self.device)

    def accept(self, token: int, context_full: bool, logprob: TokenLogprob | None = None
               ) -> None:
        """Record a sampled token (and its logprobs, when asked for) and decide whether the
        request ends with it."""
        if token in self.params.stop_token_ids:
            self.stop_token_id = token
            self._finish("stop", None)
            return
        self.tokens.append(token)
        if logprob is not None:
            self.logprobs.append(logprob)
        if self.detok is not None and self.stop_text.add(self.detok.push(token)):
            self._finish("stop", token, logprob)
        elif self.params.max_tokens is not None and len(self.tokens) >= self.params.max_tokens:
            self._finish("length", token, logprob)
        elif context_full:
            self._finish("context", token, logprob)
        else:
            self.deltas.append(StreamDelta(token, self._text(final=False), False, None,
                                           logprob=logprob))

    def expire(self) -> None:
        """End a request that waited too long for a cache row."""
        self._finish("timeout", None)

    def _finish(self, reason: str, token: int | None, logprob: TokenLogprob | None = None
                ) -> None:
        self.finish_reason = reason
        if self.detok is not None and not self.stop_text.stopped:
            self.stop_text.add(self.detok.flush())
        self.deltas.append(StreamDelta(token, self._text(final=True), True, reason,
                                       logprob=logprob))

    def _text(self, final: bool) -> str:
        return self.stop_text.emittable(final) if self.detok is not None else ""

    def output(self) -> RequestOutput:
        text = self.stop_text.text if self.detok is not None else None
        logprobs = list(self.logprobs) if self.params.logprobs is not None else None
        return RequestOutput(self.id, list(self.prompt), list(self.tokens), text,
                             self.finished, self.finish_reason, self.stop_token_id, logprobs)
