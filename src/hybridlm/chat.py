"""Chat templates: how a conversation becomes tokens, shared by fine-tuning
(hybridlm.train.sft_data) and generation (`hybridlm generate --chat`).

Rendering (`ChatTemplate`): each turn is its role marker followed by its content. System and
user turns end with ``turn_end``; an assistant turn ends with the end-of-text token instead,
the token generation stops at. Markers are plain text, so the vocabulary never grows (and
generation also stops at them: `ChatTemplate.stop_strings`, as `generate --chat` does). The loss
covers exactly the assistant contents and the end-of-text token after each of them (every
assistant turn of a conversation is trained); markers, system and user turns are context only.
Markers, contents and ``turn_end`` are encoded separately and concatenated, so the mask falls
exactly on the content tokens and `render_prompt` is a token-exact prefix of `render`.
Contents are encoded as text, so a literal ``<|endoftext|>`` inside a message becomes the eos
token (markers may not contain it).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from hybridlm.data.tokenizer import EOS_TOKEN, Tokenizer
from hybridlm.outputs import write_text_atomic

CHAT_TEMPLATE_FILE = "chat_template.json"
ROLES = ("system", "user", "assistant")

Message = dict[str, str]  # {"role": ..., "content": ...}
Example = tuple[list[int], list[bool]]  # token ids and loss mask of one rendered conversation


@dataclass(frozen=True)
class ChatTemplate:
    """Plain-text role markers; see the module doc for the rendered layout."""

    system: str = "<|system|>\n"
    user: str = "<|user|>\n"
    assistant: str = "<|assistant|>\n"
    turn_end: str = "\n"  # after system and user turns (an assistant turn ends with eos)

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, str):
                raise ValueError(f"chat template: {f.name!r} must be a string, got {value!r}")
            if f.name in ROLES and not value:
                raise ValueError(f"chat template: the {f.name!r} marker must not be empty")
            try:  # a lone surrogate (an escape like \\ud800 in the JSON) is not text
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError(f"chat template: {f.name!r} holds a lone surrogate, which is "
                                 "not Unicode text") from None
            if EOS_TOKEN in value:
                raise ValueError(
                    f"chat template: {f.name!r} must not contain {EOS_TOKEN!r}, which ends "
                    "assistant turns"
                )

    # --- files ---
    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ChatTemplate:
        if not isinstance(data, dict):
            raise ValueError(f"chat template must be a JSON object, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"chat template: unknown keys {unknown}; allowed: {sorted(known)}")
        return cls(**data)  # missing keys keep their defaults

    def to_dict(self) -> dict[str, str]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def load(cls, path: str | Path) -> ChatTemplate:
        """Read ``chat_template.json`` from a model/tokenizer directory (or a .json file).
        A directory without one gives the default template."""
        path = Path(path)
        file = path / CHAT_TEMPLATE_FILE if path.is_dir() else path
        if path.is_dir() and not file.exists():
            return cls()
        if file.exists() and not file.is_file():
            raise ValueError(f"chat template {file} is not a file")
        if not file.is_file():
            raise FileNotFoundError(f"chat template not found: {file}")
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except UnicodeDecodeError as err:
            raise ValueError(f"{file}: not UTF-8 text (byte {err.start}): a damaged "
                             "chat_template.json") from None
        except json.JSONDecodeError as err:
            raise ValueError(f"{file}: invalid JSON ({err})") from None
        try:
            return cls.from_dict(data)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{file}: {err}") from None

    def save(self, directory: str | Path) -> Path:
        """Write ``chat_template.json`` into ``directory`` (created if needed), whole: an
        interrupted save leaves the earlier file; returns it."""
        file = Path(directory) / CHAT_TEMPLATE_FILE
        write_text_atomic(file, json.dumps(self.to_dict(), indent=2) + "\n")
        return file

    # --- rendering ---
    def render(self, messages: Sequence[Message], tokenizer: Tokenizer) -> Example:
        """Token ids and loss mask (True = trained) of a conversation with at least one
        assistant turn: the mask is True on each assistant content and the eos after it."""
        check_messages(messages)
        if not any(m["role"] == "assistant" for m in messages):
            raise ValueError("conversation has no assistant turn: nothing to train on")
        ids: list[int] = []
        mask: list[bool] = []
        for message in messages:
            for piece_ids, trained in self._turn(message, tokenizer):
                ids.extend(piece_ids)
                mask.extend([trained] * len(piece_ids))
        return ids, mask

    def render_prompt(self, messages: Sequence[Message], tokenizer: Tokenizer) -> list[int]:
        """Token ids to generate the next assistant turn from: the conversation so far, then
        the assistant marker. Generation should stop at the eos token."""
        check_messages(messages)
        ids = [i for m in messages for piece, _ in self._turn(m, tokenizer) for i in piece]
        return ids + tokenizer.encode(self.assistant)

    def stop_strings(self) -> list[str]:
        """Where a generated assistant turn must end besides eos: the role markers (stripped
        of surrounding whitespace), since they are plain text a model can write, running on
        into a turn of its own invention."""
        markers = (getattr(self, role).strip() or getattr(self, role) for role in ROLES)
        return list(dict.fromkeys(markers))

    def _turn(self, message: Message, tokenizer: Tokenizer) -> list[tuple[list[int], bool]]:
        role, content = message["role"], message["content"]
        marker = tokenizer.encode(getattr(self, role))
        body = tokenizer.encode(content) if content else []
        if role == "assistant":
            return [(marker, False), (body, True), ([tokenizer.eos_token_id], True)]
        end = tokenizer.encode(self.turn_end) if self.turn_end else []
        return [(marker, False), (body, False), (end, False)]


def check_messages(messages: Any) -> None:
    """Raise ValueError unless `messages` is a non-empty list of {"role", "content"} dicts."""
    if not isinstance(messages, list | tuple) or not messages:
        raise ValueError("'messages' must be a non-empty list")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(f"message {i} must be an object, got {type(message).__name__}")
        for key in ("role", "content"):
            if key not in message:
                raise ValueError(f"message {i} has no {key!r}")
        if message["role"] not in ROLES:
            raise ValueError(
                f"message {i} has unknown role {message['role']!r}; allowed: {list(ROLES)}"
            )
        if not isinstance(message["content"], str):
            raise ValueError(
                f"message {i} content must be a string, got {type(message['content']).__name__}"
            )
