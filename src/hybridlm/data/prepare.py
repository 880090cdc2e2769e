"""Tokenize document splits into flat binary token files for training and evaluation.

Layout of a prepared directory::

    out_dir/
      train.bin, validation.bin, test.bin   flat token ids, numpy uint16 (uint32 if vocab > 65536)
      token_counts.npy                      int64 (vocab_size,): count of each id in train.bin
      tokenizer.json                        the tokenizer used
      meta.json                             vocab_size, dtype, tokens/documents per split, source

Each document is encoded and followed by the end-of-text id, so a split file of ``D``
documents holds exactly ``D`` end-of-text tokens (unless a text contains the literal marker).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .corpus import Document
from .tokenizer import TOKENIZER_FILENAME, Tokenizer

META_FILENAME = "meta.json"
COUNTS_FILENAME = "token_counts.npy"
FORMAT_VERSION = 1
_ENCODE_CHUNK_CHARS = 1 << 22  # encode about 4M characters per encode_batch call


def token_dtype(vocab_size: int) -> np.dtype:
    """Smallest unsigned dtype holding ids ``0 .. vocab_size - 1`` (uint16 or uint32)."""
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def _chunks(docs: Sequence[Document]) -> Iterator[Sequence[Document]]:
    """Consecutive runs of documents of about ``_ENCODE_CHUNK_CHARS`` characters each."""
    start, size = 0, 0
    for i, doc in enumerate(docs):
        size += len(doc.text)
        if size >= _ENCODE_CHUNK_CHARS:
            yield docs[start:i + 1]
            start, size = i + 1, 0
    if start < len(docs):
        yield docs[start:]


def _write_split(
    docs: Sequence[Document], tokenizer: Tokenizer, path: Path, dtype: np.dtype,
    counts: np.ndarray | None,
) -> int:
    """Encode ``docs`` (each followed by eos) into ``path``; add id counts into ``counts``."""
    eos_arr = np.asarray([tokenizer.eos_token_id], dtype=dtype)
    total = 0
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "wb") as f:
        for chunk in _chunks(docs):
            encoded = tokenizer.encode_batch([d.text for d in chunk])
            parts = [piece for ids in encoded
                     for piece in (np.asarray(ids, dtype=dtype), eos_arr)]
            arr = np.concatenate(parts)
            arr.tofile(f)
            total += arr.size
            if counts is not None:
                counts += np.bincount(arr, minlength=counts.size).astype(np.int64)
    tmp.replace(path)
    return total


def prepare_dataset(
    documents_by_split: Mapping[str, Sequence[Document]],
    tokenizer: Tokenizer,
    out_dir: str | Path,
    source: str = "",
) -> dict[str, Any]:
    """Tokenize every split into ``out_dir/{split}.bin`` and write counts, tokenizer and meta.

    Args:
        documents_by_split: e.g. the output of :func:`~hybridlm.data.split_documents`; must
            contain ``"train"``. Empty splits give empty ``.bin`` files.
        tokenizer: tokenizer used for every split; copied to ``out_dir/tokenizer.json``.
        out_dir: output directory (created if needed; existing files are overwritten).
        source: free-form description of the corpus, stored in ``meta.json``.

    Returns:
        The metadata dict also written to ``out_dir/meta.json``.

    Raises:
        ValueError: no ``"train"`` split, or the train split has no documents.
    """
    if "train" not in documents_by_split:
        raise ValueError(
            f"documents_by_split needs a 'train' split, got {sorted(documents_by_split)}"
        )
    if not documents_by_split["train"]:
        raise ValueError("the 'train' split has no documents")
    for name in documents_by_split:
        if not name or "/" in name or name.startswith("."):
            raise ValueError(f"invalid split name {name!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab_size = tokenizer.vocab_size
    dtype = token_dtype(vocab_size)
    counts = np.zeros(vocab_size, dtype=np.int64)

    tokens: dict[str, int] = {}
    documents: dict[str, int] = {}
    for name, docs in documents_by_split.items():
        docs = list(docs)
        tokens[name] = _write_split(docs, tokenizer, out / f"{name}.bin", dtype,
                                    counts if name == "train" else None)
        documents[name] = len(docs)
    np.save(out / COUNTS_FILENAME, counts)
    tokenizer.save(out / TOKENIZER_FILENAME)

    meta: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "vocab_size": vocab_size,
        "dtype": dtype.name,
        "eos_token_id": tokenizer.eos_token_id,
        "splits": list(documents_by_split),
        "tokens": tokens,
        "documents": documents,
        "source": source,
    }
    # meta.json is written last: its presence marks a complete directory.
    (out / META_FILENAME).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return meta


@dataclass
class PreparedData:
    """A directory written by :func:`prepare_dataset`. Use :func:`load_prepared` to open one."""

    out_dir: Path
    meta: dict[str, Any]
    _counts: np.ndarray | None = field(default=None, repr=False)

    @property
    def tokenizer_path(self) -> Path:
        return self.out_dir / TOKENIZER_FILENAME

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.meta["dtype"])

    @property
    def splits(self) -> list[str]:
        return list(self.meta["splits"])

    @property
    def token_counts(self) -> np.ndarray:
        """int64 array (vocab_size,): occurrences of each token id in the train split."""
        if self._counts is None:
            self._counts = np.load(self.out_dir / COUNTS_FILENAME)
        return self._counts

    def split(self, name: str) -> np.ndarray:
        """Read-only memory map (N,) of the token ids of split ``name``."""
        if name not in self.meta["splits"]:
            raise KeyError(f"unknown split {name!r}; available: {self.splits}")
        path = self.out_dir / f"{name}.bin"
        if not path.is_file():
            raise FileNotFoundError(f"missing split file {path}")
        expected = int(self.meta["tokens"][name])
        actual = path.stat().st_size // self.dtype.itemsize
        if actual != expected:
            raise ValueError(f"{path} holds {actual} tokens but meta.json says {expected}")
        if expected == 0:
            return np.zeros(0, dtype=self.dtype)
        return np.memmap(path, dtype=self.dtype, mode="r", shape=(expected,))

    def load_tokenizer(self) -> Tokenizer:
        return Tokenizer.from_file(self.tokenizer_path)


def load_prepared(out_dir: str | Path) -> PreparedData:
    """Open a directory written by :func:`prepare_dataset`.

    Raises:
        FileNotFoundError: the directory or any of its files is missing (all are named).
    """
    out = Path(out_dir)
    if not out.is_dir():
        raise FileNotFoundError(f"prepared data directory not found: {out}")
    required = [META_FILENAME, COUNTS_FILENAME, TOKENIZER_FILENAME]
    missing = [name for name in required if not (out / name).is_file()]
    if not missing:
        meta = json.loads((out / META_FILENAME).read_text(encoding="utf-8"))
        missing = [f"{s}.bin" for s in meta.get("splits", []) if not (out / f"{s}.bin").is_file()]
    if missing:
        raise FileNotFoundError(
            f"prepared data in {out} is incomplete, missing: {', '.join(missing)} "
            "(run prepare_dataset again)"
        )
    return PreparedData(out_dir=out, meta=meta)
