"""Per-request sampling settings of the engine, validated when built."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

MAX_LOGPROBS = 20  # top alternatives a request may ask for, as OpenAI allows


@dataclass(frozen=True)
class SamplingParams:
    """How one request picks its tokens and when it stops.

    max_tokens None: until a stop token / string or the end of the context. temperature 0
    is greedy. top_k / top_p / min_p narrow the candidates (None / 1.0 / 0.0:
    off). repetition_penalty (1.0: off) divides the positive logits and multiplies the
    negative ones of every token of the prompt and the output; presence_penalty is
    subtracted once from each token already generated, frequency_penalty once per time it
    was generated (OpenAI's definitions). stop_token_ids and stop (strings) end the request
    and are not part of its output. seed makes sampling reproducible. logprobs (None: off):
    each generated token also carries its log-probability and that of the `logprobs` most
    likely tokens, under the model's raw logits (before penalties and temperature)."""

    max_tokens: int | None = 16
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    stop: tuple[str, ...] = field(default_factory=tuple)
    seed: int | None = None
    logprobs: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        object.__setattr__(self, "stop", (self.stop,) if isinstance(self.stop, str)
                           else tuple(self.stop))
        if self.max_tokens is not None:
            _check_int("max_tokens", self.max_tokens, low=1)
        _check_float("temperature", self.temperature, ">= 0", lambda x: x >= 0)
        if self.top_k is not None:
            _check_int("top_k", self.top_k, low=1)
        _check_float("top_p", self.top_p, "in (0, 1]", lambda x: 0 < x <= 1)
        _check_float("min_p", self.min_p, "in [0, 1]", lambda x: 0 <= x <= 1)
        _check_float("repetition_penalty", self.repetition_penalty, "> 0", lambda x: x > 0)
        for name in ("presence_penalty", "frequency_penalty"):
            _check_float(name, getattr(self, name), "in [-2, 2]", lambda x: -2 <= x <= 2)
        for token in self.stop_token_ids:
            _check_int("stop_token_ids", token, low=0)
        for text in self.stop:
            if not isinstance(text, str) or not text:
                raise ValueError(f"stop={self.stop!r}: every stop string must be a non-empty "
                                 "str")
        if self.seed is not None:
            _check_int("seed", self.seed, low=0)
            if self.seed >= 2**64:  # what a torch.Generator takes
                raise ValueError(f"seed={self.seed} must be an int in [0, 2**64)")

        if self.logprobs is not None:
            _check_int("logprobs", self.logprobs, low=0)
            if self.logprobs > MAX_LOGPROBS:
                raise ValueError(f"logprobs={self.logprobs} must be an int in [0, "
                                 f"{MAX_LOGPROBS}]")

    def for_choices(self, n: int) -> list[SamplingParams]:
        """The params of n independent choices of one prompt: with a seed, choice i uses
        seed + i, so the choices differ and each is reproducible."""
        _check_int("n", n, low=1)
        if self.seed is None:
            return [self] * n
        if self.seed + n - 1 >= 2**64:
            raise ValueError(f"seed={self.seed} with n={n}: choice i uses seed + i, which "
                             "must stay below 2**64")
        return [dataclasses.replace(self, seed=self.seed + i) for i in range(n)]

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _check_int(name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name}={value!r} must be an int >= {low}")


def _check_float(name: str, value, allowed: str, ok) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not (
            math.isfinite(value) and ok(value)):
        raise ValueError(f"{name}={value!r} must be a finite number {allowed}")
