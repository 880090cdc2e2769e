"""Text of a token stream, one token at a time, never ending in half a UTF-8 character, and
the stop strings that cut it."""

from __future__ import annotations

from collections.abc import Sequence

REPLACEMENT = "\ufffd"  # what decode gives for the bytes of an unfinished character


class IncrementalDetokenizer:
    """Feeds token ids one by one and hands back the new text each completes.

    Decodes a short window: the tokens since the last emitted boundary (`read`) plus those
    before it back to the previous boundary (`prefix`), so tokenizers whose text of a token
    depends on its left neighbour (leading spaces) decode as in one piece. While the window
    ends in U+FFFD a multi-byte character is unfinished and nothing is emitted."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0
        self.read = 0

    def push(self, token: int) -> str:
        """Add one token; return the text it completes ("" while a character is unfinished)."""
        self.ids.append(token)
        before = self.tokenizer.decode(self.ids[self.prefix:self.read])
        after = self.tokenizer.decode(self.ids[self.prefix:])
        if len(after) <= len(before) or after.endswith(REPLACEMENT):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return after[len(before):]

    def flush(self) -> str:
        """The text of the tokens still held back (an unfinished character stays U+FFFD)."""
        before = self.tokenizer.decode(self.ids[self.prefix:self.read])
        after = self.tokenizer.decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return after[len(before):]


class StopText:
    """The text of one request, cut at its first stop string; `emittable` is what may be
    streamed now: never a stop string, nor the start of one that the next token might
    complete."""

    def __init__(self, stop: Sequence[str]) -> None:
        self.stop = tuple(stop)
        self.longest = max((len(s) for s in self.stop), default=0)
        self.text = ""
        self.emitted = 0
        self.stopped = False

    def add(self, delta: str) -> bool:
        """Append delta; True when the text now holds a stop string (the text is cut
        before it)."""
        start = max(0, len(self.text) - self.longest + 1)
        self.text += delta
        hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        if hits:
            self.text = self.text[:min(hits)]
            self.stopped = True
        return self.stopped

    def emittable(self, final: bool) -> str:
        """The text not yet emitted that is safe to emit (all of it when final)."""
        end = len(self.text) if final or self.stopped else len(self.text) - self._held()
        delta = self.text[self.emitted:end]
        self.emitted = max(self.emitted, end)
        return delta

    def _held(self) -> int:
        """Length of the longest tail of the text that begins some stop string."""
        for size in range(min(self.longest - 1, len(self.text)), 0, -1):
            tail = self.text[-size:]
            if any(s.startswith(tail) for s in self.stop):
                return size
        return 0
