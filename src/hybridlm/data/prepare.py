"""Tokenize documents into memory-mapped token shards for training and evaluation.

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

* :func:`prepare_corpus` reads corpus files (``hybridlm data prepare``), tokenizes them with
  several worker processes and is a no-op when the directory is already up to date;
* :func:`prepare_dataset` writes documents already in memory, split by the caller;
* :func:`load_prepared` opens a prepared directory; ``.split(name)`` is a
  :class:`~hybridlm.data.stream.TokenStream` over the split's shards.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
from array import array
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from .corpus import (
    SPLITS,
    Document,
    DuplicateKeyError,
    check_fractions,
    doc_key,
    iter_input,
    list_input_files,
    split_indices,
)
from .stream import TokenStream
from .tokenizer import EOS_TOKEN_ID, TOKENIZER_FILENAME, Tokenizer

META_FILENAME = "meta.json"
COUNTS_FILENAME = "token_counts.npy"
INDEX_FILENAME = "index.json"
DOC_OFFSETS_FILENAME = "doc_offsets.npy"
FORMAT_VERSION = 2
DEFAULT_SHARD_TOKENS = 1 << 27
_TMP_TOKENS = ".tokens.tmp"
_ENCODE_CHUNK_CHARS = 1 << 22  # in-process: about 4M characters per encode_batch call
_TASK_CHARS = 1 << 20  # worker task: about 1M characters of documents
_COUNT_FLUSH_TOKENS = 1 << 22


def token_dtype(vocab_size: int) -> np.dtype:
    """Smallest unsigned dtype holding ids ``0 .. vocab_size - 1`` (uint16 or uint32)."""
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def shard_filename(i: int) -> str:
    return f"shard_{i:05d}.bin"


def default_workers() -> int:
    """``min(4, usable CPU cores)``."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(4, cores))


# ---------------------------------------------------------------------- writing
class _SplitWriter:
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


def _read_meta(out: Path) -> dict[str, Any] | None:
    try:
        meta = json.loads((out / META_FILENAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def _clear_outputs(out: Path, splits: Iterable[str]) -> None:
    """Remove what an earlier preparation wrote in ``out``; ``meta.json`` goes first, so an
    interruption never leaves a directory that looks complete."""
    old = _read_meta(out)
    (out / META_FILENAME).unlink(missing_ok=True)
    if not out.is_dir():
        return
    names = set(splits) | set(SPLITS)
    if old is not None:
        names |= {str(s) for s in old.get("splits", []) if isinstance(s, str)}
    for name in sorted(names):
        if not name or "/" in name or name.startswith("."):
            continue
        (out / f"{name}.bin").unlink(missing_ok=True)  # format 1 layout
        split_dir = out / name
        if split_dir.is_dir():
            for path in [*split_dir.glob("shard_*.bin"), split_dir / INDEX_FILENAME,
                         split_dir / DOC_OFFSETS_FILENAME]:
                path.unlink(missing_ok=True)
    for name in (COUNTS_FILENAME, _TMP_TOKENS):
        (out / name).unlink(missing_ok=True)


def _check_split_names(names: Iterable[str]) -> None:
    for name in names:
        if not isinstance(name, str) or not name or "/" in name or "\\" in name \
                or name.startswith("."):
            raise ValueError(f"invalid split name {name!r}")


def _write_meta(out: Path, meta: dict[str, Any]) -> None:
    # meta.json is written last: its presence marks a complete directory.
    _write_json(out / META_FILENAME, meta)


def _split_meta(indexes: Mapping[str, dict[str, Any]]) -> dict[str, Any]:
    return {
        "splits": list(indexes),
        "tokens": {name: idx["num_tokens"] for name, idx in indexes.items()},
        "documents": {name: idx["num_documents"] for name, idx in indexes.items()},
        "shards": {name: len(idx["shards"]) for name, idx in indexes.items()},
    }


def _check_shard_tokens(shard_tokens: int) -> None:
    if not isinstance(shard_tokens, (int, np.integer)) or shard_tokens < 1:
        raise ValueError(f"shard_tokens must be an int >= 1, got {shard_tokens!r}")


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


def prepare_dataset(
    documents_by_split: Mapping[str, Sequence[Document]],
    tokenizer: Tokenizer,
    out_dir: str | Path,
    source: str = "",
    *,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
) -> dict[str, Any]:
    """Tokenize documents already split in memory into the sharded layout of ``out_dir``.

    Documents are written in the given order, in this process (see :func:`prepare_corpus`
    for corpus files, several workers and up-to-date checks).

    Args:
        documents_by_split: e.g. the output of :func:`~hybridlm.data.split_documents`; must
            contain ``"train"``. Empty splits give a split directory without shards.
        tokenizer: tokenizer used for every split; copied to ``out_dir/tokenizer.json``.
        out_dir: output directory (created if needed; an earlier preparation is replaced).
        source: free-form description of the corpus, stored in ``meta.json``.
        shard_tokens: most tokens per shard file.

    Returns:
        The metadata dict also written to ``out_dir/meta.json``.

    Raises:
        ValueError: no ``"train"`` split, the train split has no documents, an invalid split
            name or ``shard_tokens`` < 1.
    """
    if "train" not in documents_by_split:
        raise ValueError(
            f"documents_by_split needs a 'train' split, got {sorted(documents_by_split)}"
        )
    if not documents_by_split["train"]:
        raise ValueError("the 'train' split has no documents")
    _check_split_names(documents_by_split)
    _check_shard_tokens(shard_tokens)
    out = Path(out_dir)
    _clear_outputs(out, documents_by_split)
    out.mkdir(parents=True, exist_ok=True)
    vocab_size = tokenizer.vocab_size
    dtype = token_dtype(vocab_size)
    tokenizer.save(out / TOKENIZER_FILENAME)
    eos = np.asarray([tokenizer.eos_token_id], dtype=dtype)

    indexes: dict[str, dict[str, Any]] = {}
    counts = np.zeros(vocab_size, dtype=np.int64)
    for name, docs in documents_by_split.items():
        writer = _SplitWriter(out / name, dtype, int(shard_tokens),
                              vocab_size if name == "train" else None)
        try:
            for chunk in _chunks(list(docs)):
                for ids in tokenizer.encode_batch([d.text for d in chunk]):
                    writer.add(np.concatenate([np.asarray(ids, dtype=dtype), eos]))
            indexes[name] = writer.finish()
        finally:
            writer.abort()
        if writer.counts is not None:
            counts = writer.counts
    np.save(out / COUNTS_FILENAME, counts)
    meta: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "vocab_size": vocab_size,
        "dtype": dtype.name,
        "eos_token_id": tokenizer.eos_token_id,
        **_split_meta(indexes),
        "shard_tokens": int(shard_tokens),
        "source": source,
        "fingerprint": None,
    }
    _write_meta(out, meta)
    return meta


# ---------------------------------------------------------------------- corpus files
def _tokenizer_file(tokenizer: str | Path) -> Path:
    path = Path(tokenizer)
    file = path / TOKENIZER_FILENAME if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"tokenizer file not found: {file}")
    return file


def _as_path_list(inputs: str | Path | Iterable[str | Path]) -> list[Path]:
    if isinstance(inputs, (str, Path)):
        return [Path(inputs)]
    return [Path(p) for p in inputs]


def corpus_fingerprint(
    inputs: str | Path | Iterable[str | Path],
    tokenizer_json: bytes,
    val_fraction: float,
    test_fraction: float,
    shard_tokens: int,
) -> str:
    """sha256 (hex) over the input paths and every corpus file's path, size and mtime, the
    tokenizer file's content, the split fractions and the shard size."""
    paths = _as_path_list(inputs)
    files = []
    for file in list_input_files(paths):
        st = file.stat()
        files.append([str(file.resolve()), st.st_size, st.st_mtime_ns])
    record = {
        "format_version": FORMAT_VERSION,
        "inputs": sorted(str(p.resolve()) for p in paths),
        "files": sorted(files),
        "tokenizer_sha256": hashlib.sha256(tokenizer_json).hexdigest(),
        "val_fraction": float(val_fraction),
        "test_fraction": float(test_fraction),
        "shard_tokens": int(shard_tokens),
    }
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode("utf-8")).hexdigest()


_WORKER: dict[str, Any] = {}


def _init_worker(tokenizer_file: str, dtype: str) -> None:
    # One process per core already: keep the tokenizer's own thread pool out of the way.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _WORKER["tokenizer"] = Tokenizer.from_file(tokenizer_file)
    _WORKER["dtype"] = np.dtype(dtype)


def _encode_task(task: tuple[list[str], list[str]]) -> tuple[np.ndarray, ...]:
    return _encode(_WORKER["tokenizer"], _WORKER["dtype"], task)


def _encode(tokenizer: Tokenizer, dtype: np.dtype,
            task: tuple[list[str], list[str]]) -> tuple[np.ndarray, ...]:
    """(ids, texts) -> (tokens with eos after each document, lengths, key_hi, key_lo)."""
    ids, texts = task
    encoded = tokenizer.encode_batch(texts)
    lengths = np.fromiter((len(e) + 1 for e in encoded), dtype=np.int64, count=len(encoded))
    tokens = np.empty(int(lengths.sum()), dtype=dtype)
    pos = 0
    for e in encoded:
        tokens[pos:pos + len(e)] = e
        tokens[pos + len(e)] = EOS_TOKEN_ID
        pos += len(e) + 1
    keys = np.array([doc_key(i) for i in ids], dtype=np.uint64).reshape(-1, 2)
    return tokens, lengths, keys[:, 0].copy(), keys[:, 1].copy()


def _mp_context() -> Any:
    """Worker processes start from a fresh interpreter (never a fork of this one, which may
    hold threads); with forkserver the package is imported once, not once per worker."""
    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload([__name__])
        return ctx
    return mp.get_context("spawn")


def _run_tasks(tasks: Iterable[tuple[Any, Any]], workers: int, tokenizer_file: Path,
               dtype: np.dtype) -> Iterator[tuple[Any, tuple[np.ndarray, ...]]]:
    """Encode ``(payload, tag)`` tasks in order; yields ``(tag, result)``. At most
    ``2 * workers`` tasks are in flight, so the corpus is never read far ahead."""
    if workers == 1:
        tokenizer = Tokenizer.from_file(tokenizer_file)
        for payload, tag in tasks:
            yield tag, _encode(tokenizer, dtype, payload)
        return
    with _mp_context().Pool(workers, initializer=_init_worker,
                            initargs=(str(tokenizer_file), dtype.str)) as pool:
        pending: deque = deque()
        for payload, tag in tasks:
            pending.append((tag, pool.apply_async(_encode_task, (payload,))))
            if len(pending) >= 2 * workers:
                tag0, result = pending.popleft()
                yield tag0, result.get()
        while pending:
            tag0, result = pending.popleft()
            yield tag0, result.get()


def _tasks(inputs: list[Path], file_sizes: list[int]) -> Iterator[tuple[Any, tuple[int, int]]]:
    """Batches of documents of about ``_TASK_CHARS`` characters, tagged with (documents,
    input bytes read so far)."""
    before = np.concatenate([[0], np.cumsum(file_sizes)]).tolist()
    ids: list[str] = []
    texts: list[str] = []
    chars, done = 0, 0
    for doc, number, pos in iter_input(inputs):
        ids.append(doc.id)
        texts.append(doc.text)
        chars += len(doc.text)
        done = before[number] + pos
        if chars >= _TASK_CHARS:
            yield (ids, texts), (len(ids), done)
            ids, texts, chars = [], [], 0
    if ids:
        yield (ids, texts), (len(ids), before[-1])


def _doc_id_at(inputs: list[Path], index: int) -> str:
    for i, (doc, _, _) in enumerate(iter_input(inputs)):
        if i == index:
            return doc.id
    return f"#{index}"


def prepare_corpus(
    inputs: str | Path | Iterable[str | Path],
    tokenizer: str | Path,
    out_dir: str | Path,
    *,
    workers: int | None = None,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    val_fraction: float = 0.05,
    test_fraction: float = 0.05,
    progress: bool = True,
) -> dict[str, Any]:
    """Tokenize corpus files into train / validation / test shards under ``out_dir``.

    Documents are read from ``inputs`` (``.jsonl``, ``.jsonl.xz``, ``.txt`` files and
    directories of them, see :func:`~hybridlm.data.load_documents`), split by the hash of
    their id as :func:`~hybridlm.data.split_documents` does (ordered by that hash within a
    split) and tokenized by ``workers`` processes, each loading the tokenizer from its file.
    The output is byte-identical for any number of workers.

    If ``out_dir/meta.json`` holds the same fingerprint (input paths, sizes and mtimes,
    tokenizer content, fractions, shard size), nothing is done: a line saying so is printed
    and the existing metadata returned. Otherwise an earlier preparation is replaced.

    Tokens first go, in input order, to a temporary file in ``out_dir`` (about the size of
    the output), then are written to the shards in split order.

    Args:
        inputs: one path or several.
        tokenizer: a ``tokenizer.json`` file or a directory holding one.
        out_dir: output directory (created if needed).
        workers: tokenizer processes (default: ``min(4, CPU cores)``); 1 runs in-process.
            More than one needs the calling script to guard its entry point with
            ``if __name__ == "__main__":`` (worker processes re-import it).
        shard_tokens: most tokens per shard file (default ``2**27``).
        val_fraction, test_fraction: expected fractions of documents held out.
        progress: show progress bars.

    Returns:
        The metadata dict written to ``out_dir/meta.json``.

    Raises:
        FileNotFoundError: an input or the tokenizer does not exist.
        ValueError: bad options, malformed input, duplicate ids, or an empty train split.
    """
    check_fractions(val_fraction, test_fraction)
    _check_shard_tokens(shard_tokens)
    workers = default_workers() if workers is None else workers
    if not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be an int >= 1, got {workers!r}")
    paths = _as_path_list(inputs)
    if not paths:
        raise ValueError("no input paths given")
    tok_file = _tokenizer_file(tokenizer)
    tok_json = tok_file.read_bytes()
    fingerprint = corpus_fingerprint(paths, tok_json, val_fraction, test_fraction, shard_tokens)
    out = Path(out_dir)
    existing = _read_meta(out)
    if existing is not None and existing.get("fingerprint") == fingerprint:
        try:
            load_prepared(out)
        except (OSError, ValueError):
            pass  # files went missing since: prepare again
        else:
            print(f"{out} is up to date (fingerprint {fingerprint[:12]}); nothing to do")
            return existing

    vocab_size = Tokenizer.from_file(tok_file).vocab_size
    dtype = token_dtype(vocab_size)
    files = list_input_files(paths)
    sizes = [f.stat().st_size for f in files]
    _clear_outputs(out, SPLITS)
    out.mkdir(parents=True, exist_ok=True)
    (out / TOKENIZER_FILENAME).write_bytes(tok_json)
    tmp = out / _TMP_TOKENS
    try:
        his, los, lens = [], [], []
        total = 0
        with open(tmp, "wb", buffering=1 << 20) as f, tqdm(
            total=sum(sizes), unit="B", unit_scale=True, desc="tokenize", disable=not progress,
            mininterval=1.0, dynamic_ncols=True,
        ) as bar:
            n_docs = 0
            for (docs, done), (tokens, lengths, hi, lo) in _run_tasks(
                _tasks(paths, sizes), workers, out / TOKENIZER_FILENAME, dtype
            ):
                f.write(tokens)
                his.append(hi)
                los.append(lo)
                lens.append(lengths)
                total += int(tokens.size)
                n_docs += docs
                bar.update(done - bar.n)
                bar.set_postfix(docs=n_docs, tokens=total, refresh=False)
        if total == 0:
            raise ValueError(
                f"corpus at {', '.join(map(str, paths))} contains no non-empty documents"
            )
        key_hi, key_lo = np.concatenate(his), np.concatenate(los)
        lengths = np.concatenate(lens)
        del his, los, lens
        try:
            parts = split_indices(key_hi, key_lo, val_fraction, test_fraction)
        except DuplicateKeyError as err:
            raise ValueError(
                f"duplicate document id {_doc_id_at(paths, err.index)!r} in "
                f"{', '.join(map(str, paths))}"
            ) from None
        if parts["train"].size == 0:
            raise ValueError("the 'train' split has no documents")
        starts = np.cumsum(lengths) - lengths
        # a plain ndarray view of the map: slicing it per document is cheap
        source = np.memmap(tmp, dtype=dtype, mode="r", shape=(total,)).view(np.ndarray)
        indexes: dict[str, dict[str, Any]] = {}
        counts = np.zeros(vocab_size, dtype=np.int64)
        with tqdm(total=total, unit="tok", unit_scale=True, desc="write shards",
                  disable=not progress, mininterval=1.0, dynamic_ncols=True) as bar:
            for name, order in parts.items():
                writer = _SplitWriter(out / name, dtype, int(shard_tokens),
                                      vocab_size if name == "train" else None)
                try:
                    for s, n in zip(starts[order].tolist(), lengths[order].tolist(),
                                    strict=True):
                        writer.add(source[s:s + n])
                        bar.update(n)
                    indexes[name] = writer.finish()
                finally:
                    writer.abort()
                if writer.counts is not None:
                    counts = writer.counts
        del source
    finally:
        tmp.unlink(missing_ok=True)
    np.save(out / COUNTS_FILENAME, counts)
    meta: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "vocab_size": vocab_size,
        "dtype": dtype.name,
        "eos_token_id": EOS_TOKEN_ID,
        **_split_meta(indexes),
        "shard_tokens": int(shard_tokens),
        "val_fraction": float(val_fraction),
        "test_fraction": float(test_fraction),
        "inputs": [str(p) for p in paths],
        "input_files": len(files),
        "source": ", ".join(str(p) for p in paths),
        "fingerprint": fingerprint,
    }
    _write_meta(out, meta)
    return meta


# ---------------------------------------------------------------------- reading
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
            self._counts = np.load(self.out_dir / COUNTS_FILENAME)
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
        return json.loads((self.out_dir / name / INDEX_FILENAME).read_text(encoding="utf-8"))

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
        return np.load(self.out_dir / name / DOC_OFFSETS_FILENAME)

    def load_tokenizer(self) -> Tokenizer:
        return Tokenizer.from_file(self.tokenizer_path)


def load_prepared(out_dir: str | Path) -> PreparedData:
    """Open a directory written by :func:`prepare_corpus` or :func:`prepare_dataset`.

    Raises:
        FileNotFoundError: the directory or any of its files is missing (all are named;
            a missing ``meta.json`` means the preparation did not finish).
        ValueError: unreadable ``meta.json``, a newer format, or a shard of the wrong size.
    """
    out = Path(out_dir)
    if not out.is_dir():
        raise FileNotFoundError(f"prepared data directory not found: {out}")
    again = "(run `hybridlm data prepare` again)"
    missing = [name for name in (COUNTS_FILENAME, TOKENIZER_FILENAME)
               if not (out / name).is_file()]
    if not (out / META_FILENAME).is_file():
        also = f"; also missing: {', '.join(missing)}" if missing else ""
        raise FileNotFoundError(
            f"prepared data in {out} is incomplete: {META_FILENAME} missing: preparation did "
            f"not finish{also} {again}"
        )
    try:
        meta = json.loads((out / META_FILENAME).read_text(encoding="utf-8"))
        version = int(meta.get("format_version", 1))
        splits = [str(s) for s in meta["splits"]]
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise ValueError(f"{out / META_FILENAME} is not valid prepared-data metadata") from err
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
        index = json.loads((out / name / INDEX_FILENAME).read_text(encoding="utf-8"))
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
