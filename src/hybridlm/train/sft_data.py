"""Supervised fine-tuning data: chat records -> template-rendered tokens -> packed rows -> batches.

Typical use::

    from hybridlm.data import Tokenizer
    from hybridlm.train.sft_data import ChatTemplate, SFTBatches, load_sft_dataset

    tok = Tokenizer.from_file("runs/demo/model")
    template = ChatTemplate.load("runs/demo/model")   # the default if no chat_template.json
    rows, stats = load_sft_dataset("sft.jsonl", tok, template, seq_len=512)
    batches = SFTBatches(rows, batch_size=16, seed=0)
    b = batches.batch(step, rank=rank, world_size=world_size)
    loss = model(b["input_ids"], labels=b["labels"], segment_ids=b["segment_ids"]).loss

Records (.jsonl, one JSON object per line, blank lines skipped) are either
``{"prompt": str, "response": str}`` (the chat [user, assistant]) or
``{"messages": [{"role": "system" | "user" | "assistant", "content": str}, ...]}`` with at
least one assistant turn. Other keys of a record or a message are ignored.

Rendering: `hybridlm.chat.ChatTemplate` (shared with `generate --chat`); the loss covers
exactly the assistant contents and the end-of-text token after each of them.

Packing (`pack_examples`): examples are placed best-fit-decreasing into rows of exactly
``seq_len`` tokens, each example its own segment; rows are padded with end-of-text tokens in a
segment of their own, unsupervised. The model (`HybridLM.forward(..., segment_ids=...)`)
computes every segment as if it were alone.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hybridlm.chat import (  # noqa: F401  (CHAT_TEMPLATE_FILE, ROLES: their old home)
    CHAT_TEMPLATE_FILE,
    ROLES,
    ChatTemplate,
    Example,
    Message,
    check_messages,
)
from hybridlm.data.corpus import parse_json_line
from hybridlm.data.tokenizer import Tokenizer

IGNORE_INDEX = -100  # label that the loss skips


# --- records ------------------------------------------------------------------------------------
def record_to_messages(record: Any) -> list[Message]:
    """One record -> its conversation. Raises ValueError describing what is wrong."""
    if not isinstance(record, dict):
        raise ValueError(f"record must be a JSON object, got {type(record).__name__}")
    if "messages" in record:
        if "prompt" in record or "response" in record:
            raise ValueError("record has both 'messages' and 'prompt'/'response'; use one form")
        messages = record["messages"]
        check_messages(messages)
        if not any(m["role"] == "assistant" for m in messages):
            raise ValueError("conversation has no assistant turn: nothing to train on")
        return [{"role": m["role"], "content": m["content"]} for m in messages]
    if "prompt" in record or "response" in record:
        for key in ("prompt", "response"):
            if key not in record:
                raise ValueError(f"record has no {key!r} (a prompt/response record needs both)")
            if not isinstance(record[key], str):
                raise ValueError(f"{key!r} must be a string, got {type(record[key]).__name__}")
        return [{"role": "user", "content": record["prompt"]},
                {"role": "assistant", "content": record["response"]}]
    raise ValueError(
        f"record has neither 'messages' nor 'prompt'/'response' (keys: {sorted(record)})"
    )


def _utf8_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, line) of a text file; a file that is not UTF-8 (binary, compressed)
    raises ValueError naming it."""
    line_no = 0
    with path.open(encoding="utf-8") as f:
        try:
            for line_no, line in enumerate(f, start=1):
                yield line_no, line
        except UnicodeDecodeError:
            hint = " (compressed? SFT data is read as plain .jsonl)" \
                if path.suffix in (".xz", ".gz", ".zst", ".bz2") else ""
            where = f" after line {line_no}" if line_no else ""
            raise ValueError(f"{path}: not UTF-8 text{where}: a binary file or another "
                             f"encoding{hint}") from None


def read_sft_records(path: str | Path) -> list[list[Message]]:
    """Conversations of a .jsonl file, in file order. Bad records raise ValueError naming the
    file and line; a missing file raises FileNotFoundError, one without records ValueError."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"SFT data {path} is a directory; give a .jsonl file of records")
    if not path.is_file():
        raise FileNotFoundError(f"SFT data file not found: {path}")
    conversations = []
    for line_no, line in _utf8_lines(path):
        if not line.strip():
            continue
        record = parse_json_line(line, f"{path}, line {line_no}")
        try:
            conversations.append(record_to_messages(record))
        except ValueError as err:
            raise ValueError(f"{path}, line {line_no}: {err}") from None
    if not conversations:
        raise ValueError(f"{path}: no records (the file is empty)")
    return conversations


# --- packing -----------------------------------------------------------------------------------
@dataclass
class PackedRow:
    """One training row of exactly seq_len tokens: three int64 tensors (T,).

    segment_ids number the examples 0, 1, ... in the row; padding (eos tokens) has the id
    after the last example. labels are the token ids where trained, else -100; the label at
    each segment's first token is always -100 (nothing predicts across a boundary)."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    segment_ids: torch.Tensor
    num_examples: int  # examples packed in the row
    pad_tokens: int  # trailing padding tokens


def pack_examples(
    examples: Sequence[Example], seq_len: int, pad_token_id: int = 0
) -> list[PackedRow]:
    """Pack rendered examples into rows of exactly `seq_len` tokens, deterministically.

    Examples longer than `seq_len` keep their first `seq_len` tokens (`count_truncated`
    counts them); examples left with no trained label (empty, or truncated before the
    response) are skipped. Placement is best-fit decreasing: longest first (ties in input
    order), each into the row whose free space fits it most tightly, else a new row.
    """
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    items = []
    for index, (ids, mask) in enumerate(examples):
        if len(ids) != len(mask):
            raise ValueError(f"example {index}: {len(ids)} ids but {len(mask)} mask entries")
        ids, mask = list(ids[:seq_len]), list(mask[:seq_len])
        if not any(mask[1:]):  # a segment's first label never trains
            continue
        items.append((ids, mask))
    order = sorted(range(len(items)), key=lambda i: (-len(items[i][0]), i))
    contents: list[list[int]] = []  # the items of each row
    free: list[tuple[int, int]] = []  # (free tokens, row) sorted: best fit = first that fits
    for i in order:
        size = len(items[i][0])
        slot = bisect.bisect_left(free, (size, -1))
        if slot < len(free):
            room, row = free.pop(slot)
            contents[row].append(i)
            if room > size:
                bisect.insort(free, (room - size, row))
        else:
            contents.append([i])
            if seq_len > size:
                bisect.insort(free, (seq_len - size, len(contents) - 1))
    return [_build_row([items[i] for i in row], seq_len, pad_token_id) for row in contents]


def _build_row(items: list[Example], seq_len: int, pad_token_id: int) -> PackedRow:
    ids, labels, segments = [], [], []
    for segment, (item_ids, mask) in enumerate(items):
        ids.extend(item_ids)
        labels.append(IGNORE_INDEX)  # the first token of a segment is never a target
        pairs = zip(item_ids[1:], mask[1:], strict=True)
        labels.extend(token if trained else IGNORE_INDEX for token, trained in pairs)
        segments.extend([segment] * len(item_ids))
    pad = seq_len - len(ids)
    ids.extend([pad_token_id] * pad)
    labels.extend([IGNORE_INDEX] * pad)
    segments.extend([len(items)] * pad)
    return PackedRow(torch.tensor(ids, dtype=torch.long), torch.tensor(labels, dtype=torch.long),
                     torch.tensor(segments, dtype=torch.long), len(items), pad)


def count_truncated(examples: Sequence[Example], seq_len: int) -> int:
    """Examples longer than `seq_len` (cut by `pack_examples`)."""
    return sum(len(ids) > seq_len for ids, _ in examples)


# --- dataset -------------------------------------------------------------------------------------
@dataclass
class SFTStats:
    examples: int  # records read
    truncated: int  # examples longer than seq_len, cut to it
    skipped: int  # examples with nothing left to train on after truncation (not packed)
    rows: int  # packed rows of seq_len tokens
    tokens: int  # example tokens in the rows (padding excluded)
    supervised_tokens: int  # labels that train (!= -100)
    pad_tokens: int

    @property
    def fill(self) -> float:
        """Share of row tokens that belong to an example."""
        total = self.tokens + self.pad_tokens
        return self.tokens / total if total else 0.0

    def to_dict(self) -> dict[str, float]:
        return {**{f.name: getattr(self, f.name) for f in fields(self)}, "fill": self.fill}


def load_sft_dataset(
    path: str | Path, tokenizer: Tokenizer, template: ChatTemplate, seq_len: int
) -> tuple[list[PackedRow], SFTStats]:
    """Read, render and pack a .jsonl SFT file -> (rows, stats)."""
    conversations = read_sft_records(path)
    examples = [template.render(messages, tokenizer) for messages in conversations]
    rows = pack_examples(examples, seq_len, pad_token_id=tokenizer.eos_token_id)
    pad = sum(row.pad_tokens for row in rows)
    packed = sum(row.num_examples for row in rows)
    stats = SFTStats(
        examples=len(examples),
        truncated=count_truncated(examples, seq_len),
        skipped=len(examples) - packed,
        rows=len(rows),
        tokens=len(rows) * seq_len - pad,
        supervised_tokens=sum(int((row.labels != IGNORE_INDEX).sum()) for row in rows),
        pad_tokens=pad,
    )
    return rows, stats


# --- batches -------------------------------------------------------------------------------------
class SFTBatches:
    """Batches of packed rows in a per-epoch permutation: deterministic and rank-aware.

    Epoch e visits the rows in the order ``numpy.random.default_rng([seed, e]).permutation``;
    the epochs' orders are concatenated and global step s takes positions
    ``[s*G, (s+1)*G)``, G = `batch_size` (the global batch). Rank r of `world_size` takes
    rows ``[r*G/world_size, (r+1)*G/world_size)`` of it, so the ranks' rows partition the
    single-process batch of the same step.
    """

    def __init__(self, rows: Sequence[PackedRow], batch_size: int, seed: int = 0) -> None:
        if not rows:
            raise ValueError("SFTBatches needs at least one row")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        lengths = {row.input_ids.shape[0] for row in rows}
        if len(lengths) != 1:
            raise ValueError(f"rows must all have one length, got {sorted(lengths)}")
        self.seq_len = lengths.pop()
        self.num_rows = len(rows)
        self.batch_size = batch_size
        self.seed = seed
        # One (N, T) int32 array per field: compact, and gathered per batch.
        self._data = {
            name: torch.stack([getattr(row, name) for row in rows]).to(torch.int32).numpy()
            for name in ("input_ids", "labels", "segment_ids")
        }
        self._perms: dict[int, np.ndarray] = {}

    @property
    def steps_per_epoch(self) -> float:
        return self.num_rows / self.batch_size

    def permutation(self, epoch: int) -> np.ndarray:
        perm = self._perms.get(epoch)
        if perm is None:
            perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_rows)
            if len(self._perms) > 4:
                self._perms.clear()
            self._perms[epoch] = perm
        return perm

    def indices(self, step: int, rank: int = 0, world_size: int = 1) -> np.ndarray:
        """Row indices of rank `rank`'s share of global batch `step`."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, "
                             f"world_size={world_size}")
        if self.batch_size % world_size:
            raise ValueError(
                f"batch_size={self.batch_size} is not divisible by world_size={world_size}"
            )
        local = self.batch_size // world_size
        first = step * self.batch_size + rank * local
        positions = np.arange(first, first + local, dtype=np.int64)
        epochs, offsets = np.divmod(positions, self.num_rows)
        pairs = zip(epochs.tolist(), offsets.tolist(), strict=True)
        return np.array([self.permutation(e)[o] for e, o in pairs], dtype=np.int64)

    def batch(self, step: int, rank: int = 0, world_size: int = 1) -> dict[str, torch.Tensor]:
        """input_ids, labels, segment_ids: LongTensors (batch_size / world_size, seq_len)."""
        idx = self.indices(step, rank, world_size)
        return {name: torch.from_numpy(data[idx].astype(np.int64))
                for name, data in self._data.items()}
