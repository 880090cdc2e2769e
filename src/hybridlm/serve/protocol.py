"""OpenAI request bodies (pydantic) and how their fields map onto SamplingParams.

Types are checked by pydantic in strict mode (a string where a number belongs is refused, not
coerced); ranges are left to SamplingParams, whose ValueError names the field, so each
limit is written once."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from hybridlm.infer.sampling_params import MAX_LOGPROBS, SamplingParams

MAX_STOP_STRINGS = 4  # as the OpenAI API allows
MAX_N = 16  # choices per request: each takes a cache row of its own


class RequestError(ValueError):
    """A request the server refuses: HTTP `status`, OpenAI error `type`, the field `param`."""

    def __init__(self, message: str, status: int = 400, param: str | None = None,
                 kind: str = "invalid_request_error", code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.param, self.kind, self.code = status, param, kind, code


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    include_usage: bool = False


class SamplingFields(BaseModel):
    """Fields both endpoints share. Unknown fields are ignored, as OpenAI clients send some
    this server has no use for (user, logit_bias left empty, ...). top_k, min_p and
    repetition_penalty are not OpenAI's: clients send them as extra body fields."""

    model_config = ConfigDict(strict=True, extra="ignore")

    model: str
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    top_k: int | None = None
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def sampling_params(self, max_tokens: int | None, extra_stop: tuple[str, ...] = (),
                        stop_token_ids: tuple[int, ...] = (), logprobs: int | None = None
                        ) -> SamplingParams:
        """SamplingParams of this request (each of its n choices: `for_choices`);
        RequestError naming the field when out of range."""
        if not 1 <= self.n <= MAX_N:
            raise RequestError(f"n={self.n} must be an int in [1, {MAX_N}]", param="n")
        if self.stream_options is not None and not self.stream:
            raise RequestError("stream_options is only allowed with stream: true",
                               param="stream_options")
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stop) > MAX_STOP_STRINGS:
            raise RequestError(f"stop holds {len(stop)} strings; at most {MAX_STOP_STRINGS} "
                               "are allowed", param="stop")
        try:
            params = SamplingParams(
                max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p,
                top_k=self.top_k, min_p=self.min_p,
                repetition_penalty=self.repetition_penalty,
                presence_penalty=self.presence_penalty,
                frequency_penalty=self.frequency_penalty, seed=self.seed,
                stop=tuple(dict.fromkeys([*stop, *extra_stop])),
                stop_token_ids=stop_token_ids, logprobs=logprobs)
            params.for_choices(self.n)  # refuses seed + n - 1 >= 2**64 here, naming seed
        except ValueError as err:
            field = str(err).split("=", 1)[0]
            raise RequestError(str(err), param=field) from None
        return params


class CompletionRequest(SamplingFields):
    """POST /v1/completions: prompt is text or token ids; max_tokens defaults to 16;
    logprobs: how many top alternatives each token's logprobs list (None: no logprobs)."""

    prompt: str | list[int]
    max_tokens: int | None = 16
    logprobs: int | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(SamplingFields):
    """POST /v1/chat/completions: max_tokens (or max_completion_tokens) None runs until the
    reply ends or the context is full."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None

    def engine_logprobs(self) -> int | None:
        """SamplingParams.logprobs of this request: top_logprobs alternatives, or None."""
        if self.top_logprobs is None:
            return 0 if self.logprobs else None
        if not self.logprobs:
            raise RequestError("top_logprobs needs logprobs: true", param="top_logprobs")
        if not 0 <= self.top_logprobs <= MAX_LOGPROBS:
            raise RequestError(f"top_logprobs={self.top_logprobs} must be an int in [0, "
                               f"{MAX_LOGPROBS}]", param="top_logprobs")
        return self.top_logprobs
