"""On-disk layout of prepared token data: writing the shards of a split, opening them again.

Layout of a prepared directory::

    out_dir/
      train/                    one directory per split (train, validation, test, ...)
        shard_00000.bin ...     flat token ids, numpy uint16 (uint32 if vocab > 65536); each
                                shard holds at most ``shard_tokens`` tokens and documents are
                                never cut across shards unless a document alone is larger
        index.json              dtype, token and document counts, the shards with their sizes
        doc_offsets.npy         int64 (D,): start of every document in the split's token stream
      token_counts.npy          int64 (vocab_size,): count of each id in the train split
      tokenizer.json            the tokenizer used
      meta.json                 vocab_size, dtype, tokens/documents/shards per split, source,
                                fingerprint of the inputs; written last, so its presence marks
                                a complete directory

Each document is encoded and followed by the end-of-text id, so a split of ``D`` documents
holds exactly ``D`` end-of-text tokens (unless a text contains the literal marker).

* :class:`SplitWriter` packs the documents of one split into its shards and writes its
  ``index.json`` and ``doc_offsets.npy``; :func:`write_meta` marks the directory complete
  (the writers build it in a temporary directory moved into place, see
  :mod:`hybridlm.outputs`, so an earlier preparation is only replaced whole);
* :func:`load_prepared` opens a prepared directory; ``.split(name)`` is a
  :class:`~hybridlm.data.stream.TokenStream` over the split's shards.

The directories are written by :func:`~hybridlm.data.prepare.prepare_corpus` and
:func:`~hybridlm.data.prepare.prepare_dataset`.
"""

from __future__ import annotations

import json
from array import array
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .stream import TokenStream
from .tokenizer import TOKENIZER_FILENAME, Tokenizer

META_FILENAME = "meta.json"
COUNTS_FILENAME = "token_counts.npy"
INDEX_FILENAME = "index.json"
DOC_OFFSETS_FILENAME = "doc_offsets.npy"
FORMAT_VERSION = 2
DEFAULT_SHARD_TOKENS = 1 << 27
TMP_TOKENS_FILENAME = ".tokens.tmp"
_COUNT_FLUSH_TOKENS = 1 << 22


def token_dtype(vocab_size: int) -> np.dtype:
    """Smallest unsigned dtype holding ids ``0 .. vocab_size - 1`` (uint16 or uint32)."""
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def shard_filename(i: int) -> str:
    return f"shard_{i:05d}.bin"


# ---------------------------------------------------------------------- writing
class SplitWriter:
    """Packs documents (token arrays, eos included) into the shards of one split."""

    def __init__(self, split_dir: Path, dtype: np.dtype, shard_tokens: int,
                 count_vocab: int | None = None) -> None:
        split_dir.mkdir(parents=True, exist_ok=True)
        self.dir = split_dir
        self.dtype = dtype
        self.shard_tokens = shard_tokens
        self.shards: list[dict[str, Any]] = []
        self.offsets = array("q")
        self.total = 0
        self.counts = None if count_vocab is None else np.zeros(count_vocab, dtype=np.int64)
        self._file = None
        self._in_shard = 0
        self._pending: list[np.ndarray] = []
        self._pending_tokens = 0

    def add(self, ids: np.ndarray) -> None:
        n = int(ids.shape[0])
        self.offsets.append(self.total)
        if self._in_shard and self._in_shard + n > self.shard_tokens:
            self._close_shard()
        pos = 0
        while pos < n:
            if self._file is None:
                self._open_shard()
            take = min(n - pos, self.shard_tokens - self._in_shard)
            self._file.write(np.ascontiguousarray(ids[pos:pos + take], dtype=self.dtype))
            self._in_shard += take
            pos += take
            if self._in_shard == self.shard_tokens:
                self._close_shard()
        self.total += n
        if self.counts is not None:
            self._pending.append(ids)
            self._pending_tokens += n
            if self._pending_tokens >= _COUNT_FLUSH_TOKENS:
                self._flush_counts()

    def _flush_counts(self) -> None:
        if self._pending:
            arr = np.concatenate(self._pending)
            self.counts += np.bincount(arr, minlength=self.counts.size)[: self.counts.size]
        self._pending, self._pending_tokens = [], 0

    def _open_shard(self) -> None:
        name = shard_filename(len(self.shards))
        self._file = open(self.dir / name, "wb", buffering=1 << 20)
        self.shards.append({"file": name, "num_tokens": 0})
        self._in_shard = 0

    def _close_shard(self) -> None:
        self.shards[-1]["num_tokens"] = self._in_shard
        self._file.close()
        self._file, self._in_shard = None, 0

    def finish(self) -> dict[str, Any]:
        """Close the last shard, write doc_offsets.npy and index.json; return the index."""
        if self._file is not None:
            self._close_shard()
        if self.counts is not None:
            self._flush_counts()
        offsets = np.array(np.frombuffer(self.offsets, dtype=np.int64), dtype=np.int64)
        np.save(self.dir / DOC_OFFSETS_FILENAME, offsets)
        index = {
            "format_version": FORMAT_VERSION,
            "dtype": self.dtype.name,
            "num_tokens": self.total,
            "num_documents": len(self.offsets),
            "shards": self.shards,
        }
        _write_json(self.dir / INDEX_FILENAME, index)
        return index

    def abort(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)


def read_meta(out: Path) -> dict[str, Any] | None:
    try:
        meta = json.loads((out / META_FILENAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def check_split_names(names: Iterable[str]) -> None:
    for name in names:
        if not isinstance(name, str) or not name or "/" in name or "\\" in name \
                or name.startswith("."):
            raise ValueError(f"invalid split name {name!r}")


def write_meta(out: Path, meta: dict[str, Any]) -> None:
    # meta.json is written last: its presence marks a complete directory.
    _write_json(out / META_FILENAME, meta)


def split_meta(indexes: Mapping[str, dict[str, Any]]) -> dict[str, Any]:
    return {
        "splits": list(indexes),
        "tokens": {name: idx["num_tokens"] for name, idx in indexes.items()},
        "documents": {name: idx["num_documents"] for name, idx in indexes.items()},
        "shards": {name: len(idx["shards"]) for name, idx in indexes.items()},
    }


def check_shard_tokens(shard_tokens: int) -> None:
    if not isinstance(shard_tokens, (int, np.integer)) or shard_tokens < 1:
        raise ValueError(f"shard_tokens must be an int >= 1, got {shard_tokens!r}")


# ---------------------------------------------------------------------- reading
_AGAIN = "(run `hybridlm data prepare` again)"
_TOKEN_DTYPES = ("uint16", "uint32")


def _damaged(path: Path, problem: str) -> ValueError:
    return ValueError(f"{path} is damaged: {problem} {_AGAIN}")


def _read_json_object(path: Path) -> dict[str, Any]:
    """A JSON object file of a prepared directory; anything else raises ValueError naming it."""
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise _damaged(path, f"not JSON ({err})") from None
    if not isinstance(obj, dict):
        raise _damaged(path, f"a JSON {type(obj).__name__}, not an object")
    return obj


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_meta(meta: dict[str, Any], path: Path) -> None:
    """The fields of meta.json that reading relies on."""
    splits = meta.get("splits")
    if not isinstance(splits, list) or not all(isinstance(s, str) for s in splits):
        raise _damaged(path, f"'splits' must be a list of names, got {splits!r}")
    if meta.get("dtype") not in _TOKEN_DTYPES:
        raise _damaged(path, f"'dtype' must be one of {list(_TOKEN_DTYPES)}, got "
                             f"{meta.get('dtype')!r}")
    if not _is_count(meta.get("vocab_size")) or meta["vocab_size"] < 1:
        raise _damaged(path, f"'vocab_size' must be a positive integer, got "
                             f"{meta.get('vocab_size')!r}")
    tokens = meta.get("tokens")
    if not isinstance(tokens, dict) or not all(_is_count(tokens.get(s)) for s in splits):
        raise _damaged(path, f"'tokens' must give a token count for each of {splits}, got "
                             f"{tokens!r}")


def _check_index(index: dict[str, Any], path: Path) -> None:
    """An index.json's shard list: plain file names with token counts."""
    shards = index.get("shards")
    ok = isinstance(shards, list) and all(
        isinstance(s, dict) and isinstance(s.get("file"), str) and "/" not in s["file"]
        and "\\" not in s["file"] and _is_count(s.get("num_tokens")) for s in shards)
    if not ok:
        raise _damaged(path, "'shards' must be a list of {file, num_tokens} entries")


def _load_array(path: Path) -> np.ndarray:
    """A .npy file of a prepared directory (never a pickle); a damaged one raises ValueError
    naming it."""
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, EOFError) as err:  # numpy's errors for a foreign or truncated file
        raise _damaged(path, f"not a readable .npy array ({err})") from None


@dataclass
class PreparedData:
    """A prepared directory. Use :func:`load_prepared` to open one."""

    out_dir: Path
    meta: dict[str, Any]
    _counts: np.ndarray | None = field(default=None, repr=False)
    _streams: dict[str, TokenStream] = field(default_factory=dict, repr=False)

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
    def format_version(self) -> int:
        return int(self.meta.get("format_version", 1))

    @property
    def token_counts(self) -> np.ndarray:
        """int64 array (vocab_size,): occurrences of each token id in the train split."""
        if self._counts is None:
            path = self.out_dir / COUNTS_FILENAME
            counts = _load_array(path)
            if counts.shape != (self.vocab_size,) or not np.issubdtype(counts.dtype, np.integer):
                raise _damaged(path, f"expected {self.vocab_size} integer counts (vocab_size), "
                                     f"found shape {counts.shape} of {counts.dtype}")
            self._counts = counts
        return self._counts

    def _check_split(self, name: str) -> None:
        if name not in self.meta["splits"]:
            raise KeyError(f"unknown split {name!r}; available: {self.splits}")

    def index(self, name: str) -> dict[str, Any]:
        """The split's ``index.json``: dtype, token and document counts, shard list."""
        self._check_split(name)
        if self.format_version == 1:
            n = int(self.meta["tokens"][name])
            shards = [{"file": f"{name}.bin", "num_tokens": n}] if n else []
            return {"dtype": self.dtype.name, "num_tokens": n,
                    "num_documents": int(self.meta["documents"][name]), "shards": shards}
        path = self.out_dir / name / INDEX_FILENAME
        index = _read_json_object(path)
        _check_index(index, path)
        return index

    def split(self, name: str) -> TokenStream:
        """Read-only :class:`TokenStream` (N,) over the token ids of split ``name``."""
        stream = self._streams.get(name)
        if stream is None:
            index = self.index(name)
            split_dir = self.out_dir if self.format_version == 1 else self.out_dir / name
            files = [split_dir / s["file"] for s in index["shards"]]
            lengths = [int(s["num_tokens"]) for s in index["shards"]]
            stream = TokenStream(files, dtype=self.dtype, lengths=lengths)
            if len(stream) != int(self.meta["tokens"][name]):
                raise ValueError(
                    f"split {name!r} of {self.out_dir}: the shards hold {len(stream)} tokens "
                    f"but meta.json says {self.meta['tokens'][name]}"
                )
            self._streams[name] = stream
        return stream

    def doc_offsets(self, name: str) -> np.ndarray:
        """int64 (D,): start of every document of split ``name`` in its token stream."""
        self._check_split(name)
        if self.format_version == 1:
            raise ValueError(
                f"{self.out_dir} uses the single-file layout without document offsets; "
                "prepare it again"
            )
        return _load_array(self.out_dir / name / DOC_OFFSETS_FILENAME)

    def load_tokenizer(self) -> Tokenizer:
        return Tokenizer.from_file(self.tokenizer_path)


def load_prepared(out_dir: str | Path) -> PreparedData:
    """Open a directory written by :func:`~hybridlm.data.prepare.prepare_corpus` or
    :func:`~hybridlm.data.prepare.prepare_dataset`.

    Raises:
        FileNotFoundError: the directory or any of its files is missing (all are named;
            a missing ``meta.json`` means the preparation did not finish).
        ValueError: a file instead of a directory; a damaged ``meta.json`` or ``index.json``
            (not JSON, or fields that reading relies on missing or of the wrong type), a newer
            format, or a shard of the wrong size.
    """
    out = Path(out_dir)
    if out.is_file():
        raise ValueError(f"{out} is a file, not a prepared data directory: make one from it "
                         "with `hybridlm data prepare`")
    if not out.is_dir():
        raise FileNotFoundError(f"prepared data directory not found: {out}")
    again = _AGAIN
    missing = [name for name in (COUNTS_FILENAME, TOKENIZER_FILENAME)
               if not (out / name).is_file()]
    if not (out / META_FILENAME).is_file() and not (out / COUNTS_FILENAME).exists() \
            and not any(out.glob(f"*/{INDEX_FILENAME}")):
        raise FileNotFoundError(f"{out} is not a prepared data directory (no {META_FILENAME}, "
                                "no splits): make one with `hybridlm data prepare`")
    if not (out / META_FILENAME).is_file():
        also = f"; also missing: {', '.join(missing)}" if missing else ""
        raise FileNotFoundError(
            f"prepared data in {out} is incomplete: {META_FILENAME} missing: preparation did "
            f"not finish{also} {again}"
        )
    meta = _read_json_object(out / META_FILENAME)
    version = meta.get("format_version", 1)
    if not _is_count(version):
        raise _damaged(out / META_FILENAME, f"'format_version' must be an integer, got "
                                            f"{version!r}")
    _check_meta(meta, out / META_FILENAME)
    splits = meta["splits"]
    if version > FORMAT_VERSION:
        raise ValueError(
            f"{out} has format version {version}; this hybridlm reads up to {FORMAT_VERSION}"
        )
    itemsize = np.dtype(meta["dtype"]).itemsize
    for name in splits:
        if version == 1:
            if not (out / f"{name}.bin").is_file():
                missing.append(f"{name}.bin")
            continue
        for fname in (INDEX_FILENAME, DOC_OFFSETS_FILENAME):
            if not (out / name / fname).is_file():
                missing.append(f"{name}/{fname}")
        if not (out / name / INDEX_FILENAME).is_file():
            continue
        index = _read_json_object(out / name / INDEX_FILENAME)
        _check_index(index, out / name / INDEX_FILENAME)
        for shard in index["shards"]:
            path = out / name / shard["file"]
            if not path.is_file():
                missing.append(f"{name}/{shard['file']}")
            elif path.stat().st_size != int(shard["num_tokens"]) * itemsize:
                raise ValueError(
                    f"{path} holds {path.stat().st_size} bytes but {name}/{INDEX_FILENAME} "
                    f"says {shard['num_tokens']} {meta['dtype']} tokens"
                )
    if missing:
        raise FileNotFoundError(
            f"prepared data in {out} is incomplete, missing: {', '.join(missing)} {again}"
        )
    return PreparedData(out_dir=out, meta=meta)
