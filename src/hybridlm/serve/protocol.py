"""OpenAI request bodies (pydantic) and how their fields map onto SamplingParams.

Types are checked by pydantic in strict mode (a string where a number belongs is refused, not
coerced); ranges are left to SamplingParams, whose ValueError names the field, so each
limit is written once."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from hybridlm.infer.sampling_params import SamplingParams

MAX_STOP_STRINGS = 4  # as the OpenAI API allows


class RequestError(ValueError):
    """A request the server refuses: HTTP `status`, OpenAI error `type`, the field `param`."""

    def __init__(self, message: str, status: int = 400, param: str | None = None,
                 kind: str = "invalid_request_error", code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.param, self.kind, self.code = status, param, kind, code


class SamplingFields(BaseModel):
    """Fields both endpoints share. Unknown fields are ignored, as OpenAI clients send some
    this server has no use for (user, logit_bias left empty, ...)."""

    model_config = ConfigDict(strict=True, extra="ignore")

    model: str
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stream: bool = False
    n: int = 1

    def sampling_params(self, max_tokens: int | None, extra_stop: tuple[str, ...] = (),
                        stop_token_ids: tuple[int, ...] = ()) -> SamplingParams:
        """SamplingParams of this request; RequestError naming the field when out of range."""
        if self.n != 1:
            raise RequestError(f"n={self.n}: this server returns one choice per request; "
                               "send n=1 (or several requests)", param="n")
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stop) > MAX_STOP_STRINGS:
            raise RequestError(f"stop holds {len(stop)} strings; at most {MAX_STOP_STRINGS} "
                               "are allowed", param="stop")
        try:
            return SamplingParams(
                max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p,
                presence_penalty=self.presence_penalty,
                frequency_penalty=self.frequency_penalty, seed=self.seed,
                stop=tuple(dict.fromkeys([*stop, *extra_stop])),
                stop_token_ids=stop_token_ids)
        except ValueError as err:
            field = str(err).split("=", 1)[0]
            raise RequestError(str(err), param=field) from None


class CompletionRequest(SamplingFields):
    """POST /v1/completions: prompt is text or token ids; max_tokens defaults to 16."""

    prompt: str | list[int]
    max_tokens: int | None = 16


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(SamplingFields):
    """POST /v1/chat/completions: max_tokens (or max_completion_tokens) None runs until the
    reply ends or the context is full."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
