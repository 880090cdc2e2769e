"""One HTTP request's answer built from the engine's deltas of its n choices, in the shape
of either endpoint: whole (`whole`) or as SSE chunks, with OpenAI's logprobs formats
(completions: tokens / token_logprobs / top_logprobs / text_offset; chat: a content list of
{token, logprob, bytes, top_logprobs})."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field

from hybridlm.infer.batch_sampler import TokenLogprob
from hybridlm.infer.request import StreamDelta


@dataclass
class Choice:
    text: str = ""
    completion_tokens: int = 0
    finish_reason: str | None = None
    finished: bool = False
    logprobs: list[TokenLogprob] = field(default_factory=list)
    text_offset: int = 0  # where the next token's text starts (completions' text_offset)


class Reply:
    """endpoint "completions" or "chat"; logprobs: whether the request asked for them;
    include_usage: stream_options.include_usage (a final chunk with usage and no choices)."""

    def __init__(self, endpoint: str, model: str, prompt_tokens: int, n: int, tokenizer,
                 logprobs: bool = False, include_usage: bool = False) -> None:
        self.endpoint, self.model, self.prompt_tokens = endpoint, model, prompt_tokens
        self.tokenizer, self.logprobs, self.include_usage = tokenizer, logprobs, include_usage
        self.id = f"{'chatcmpl' if endpoint == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.choices = [Choice() for _ in range(n)]
        self.failure: str | None = None  # a generation failed: 500
        self.timed_out = False  # a choice found no free cache row in time: 503

    @property
    def done(self) -> bool:
        return all(c.finished for c in self.choices)

    def add(self, index: int, delta: StreamDelta) -> None:
        choice = self.choices[index]
        choice.text += delta.text
        choice.completion_tokens += delta.token_id is not None
        if delta.logprob is not None:
            choice.logprobs.append(delta.logprob)
        if delta.finished:
            choice.finished = True
            reason = delta.finish_reason or ""
            if reason.startswith("error:"):
                self.failure = f"generation failed ({reason[len('error: '):]})"
            self.timed_out |= reason == "timeout"
            # "context": the cache is full, which OpenAI calls running out of length
            choice.finish_reason = "length" if reason == "context" else reason

    def usage(self) -> dict:
        completion = sum(c.completion_tokens for c in self.choices)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion,
                "total_tokens": self.prompt_tokens + completion}

    def _head(self, chunk: bool) -> dict:
        kind = "chat.completion" if self.endpoint == "chat" else "text_completion"
        if chunk and self.endpoint == "chat":
            kind += ".chunk"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    # --- whole answers --------------------------------------------------------------------
    def whole(self) -> dict:
        choices = []
        for index, choice in enumerate(self.choices):
            logprobs = self._logprobs(choice.logprobs, 0)[0] if self.logprobs else None
            if self.endpoint == "chat":
                choices.append({"index": index, "message": {"role": "assistant",
                                                            "content": choice.text},
                                "finish_reason": choice.finish_reason, "logprobs": logprobs})
            else:
                choices.append({"index": index, "text": choice.text,
                                "finish_reason": choice.finish_reason, "logprobs": logprobs})
        return {**self._head(False), "choices": choices, "usage": self.usage()}

    # --- stream chunks --------------------------------------------------------------------
    def role_chunks(self) -> list[dict]:
        """Chat streams open every choice with the assistant's role."""
        return [self._chunk([{"index": i, "delta": {"role": "assistant", "content": ""},
                              "finish_reason": None, "logprobs": None}])
                for i in range(len(self.choices))]

    def delta_chunk(self, index: int, delta: StreamDelta) -> dict | None:
        """The chunk of one delta of choice `index` (after `add`), or None when it carries
        nothing to send (text held back, and no logprobs asked for)."""
        choice = self.choices[index]
        logprobs = None
        if self.logprobs and delta.logprob is not None:
            logprobs, choice.text_offset = self._logprobs([delta.logprob], choice.text_offset)
        if not (delta.text or delta.finished or logprobs):
            return None
        reason = choice.finish_reason if delta.finished else None
        if self.endpoint == "chat":
            body = {"index": index, "delta": {"content": delta.text} if delta.text else {},
                    "finish_reason": reason, "logprobs": logprobs}
        else:
            body = {"index": index, "text": delta.text, "finish_reason": reason,
                    "logprobs": logprobs}
        return self._chunk([body])

    def usage_chunk(self) -> dict:
        """stream_options.include_usage: the last chunk, usage and no choices."""
        return {**self._head(True), "choices": [], "usage": self.usage()}

    def _chunk(self, choices: list[dict]) -> dict:
        body = {**self._head(True), "choices": choices}
        if self.include_usage:  # OpenAI: null on every chunk but the usage chunk
            body["usage"] = None
        return body

    # --- logprobs -------------------------------------------------------------------------
    def _logprobs(self, entries: list[TokenLogprob], offset: int) -> tuple[dict, int]:
        """The logprobs object of `entries`, whose first token's text starts at character
        `offset` of the choice's text; and where the text after them starts."""
        if self.endpoint == "chat":
            return {"content": [{**self._token(e.token_id, e.logprob), "top_logprobs": [
                self._token(t, lp) for t, lp in e.top]} for e in entries]}, offset
        tokens, offsets = [], []
        for entry in entries:
            text = self.tokenizer.decode([entry.token_id])
            tokens.append(text)
            offsets.append(offset)
            offset += len(text)
        # OpenAI's legacy format: the alternatives and the chosen token, keyed by text;
        # where two ids decode alike (pieces of one character), the likelier one's.
        top = []
        for entry in entries:
            pairs = sorted([*entry.top, (entry.token_id, entry.logprob)], key=lambda p: -p[1])
            keyed: dict[str, float] = {}
            for token_id, logprob in pairs:
                keyed.setdefault(self.tokenizer.decode([token_id]), logprob)
            top.append(keyed)
        return {"tokens": tokens, "token_logprobs": [e.logprob for e in entries],
                "top_logprobs": top, "text_offset": offsets}, offset

    def _token(self, token_id: int, logprob: float) -> dict:
        text = self.tokenizer.decode([token_id])
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}
