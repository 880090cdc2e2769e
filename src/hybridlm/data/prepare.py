"""Tokenize documents into memory-mapped token shards for training and evaluation.

The output directory has the layout described in :mod:`hybridlm.data.shards`.

* :func:`prepare_corpus` reads corpus files (``hybridlm data prepare``), tokenizes them with
  several worker processes and is a no-op when the directory is already up to date (same
  :func:`corpus_fingerprint`);
* :func:`prepare_dataset` writes documents already in memory, split by the caller.

:func:`load_prepared`, :class:`PreparedData`, :func:`token_dtype` and the layout's constants
live in :mod:`hybridlm.data.shards` and are re-exported here.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import signal
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from hybridlm.outputs import (
    PREPARED,
    check_not_an_input,
    check_output_path,
    claim_output,
    copy_file_atomic,
    staged_dir,
)

from .corpus import (
    Document,
    DuplicateKeyError,
    check_fractions,
    doc_key,
    iter_input,
    list_input_files,
    split_indices,
)
from .shards import (
    COUNTS_FILENAME,
    DEFAULT_SHARD_TOKENS,
    DOC_OFFSETS_FILENAME,
    FORMAT_VERSION,
    INDEX_FILENAME,
    META_FILENAME,
    TMP_TOKENS_FILENAME,
    PreparedData,
    SplitWriter,
    check_shard_tokens,
    check_split_names,
    load_prepared,
    read_meta,
    shard_filename,
    split_meta,
    token_dtype,
    write_meta,
)
from .tokenizer import TOKENIZER_FILENAME, Tokenizer, tokenizer_files

__all__ = [
    "COUNTS_FILENAME",
    "DEFAULT_SHARD_TOKENS",
    "DOC_OFFSETS_FILENAME",
    "FORMAT_VERSION",
    "INDEX_FILENAME",
    "META_FILENAME",
    "PreparedData",
    "corpus_fingerprint",
    "default_workers",
    "load_prepared",
    "prepare_corpus",
    "prepare_dataset",
    "shard_filename",
    "token_dtype",
]

_ENCODE_CHUNK_CHARS = 1 << 22  # in-process: about 4M characters per encode_batch call
_TASK_CHARS = 1 << 20  # worker task: about 1M characters of documents


def default_workers() -> int:
    """``min(4, usable CPU cores)``."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(4, cores))


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
    overwrite: bool = True,
) -> dict[str, Any]:
    """Tokenize documents already split in memory into the sharded layout of ``out_dir``.

    Documents are written in the given order, in this process (see :func:`prepare_corpus`
    for corpus files, several workers and up-to-date checks).

    Args:
        documents_by_split: e.g. the output of :func:`~hybridlm.data.split_documents`; must
            contain ``"train"``. Empty splits give a split directory without shards.
        tokenizer: tokenizer used for every split; copied to ``out_dir/tokenizer.json``.
        out_dir: output directory: new, empty, or an earlier preparation (replaced with
            ``overwrite``); written in a temporary directory beside it and moved into place
            once complete (:mod:`hybridlm.outputs`).
        source: free-form description of the corpus, stored in ``meta.json``.
        shard_tokens: most tokens per shard file.
        overwrite: replace an earlier preparation in ``out_dir``.

    Returns:
        The metadata dict also written to ``out_dir/meta.json``.

    Raises:
        ValueError: no ``"train"`` split, the train split has no documents, an invalid split
            name or ``shard_tokens`` < 1; :class:`~hybridlm.outputs.OutputError` for an
            ``out_dir`` that holds something else (or, without ``overwrite``, prepared data).
    """
    if "train" not in documents_by_split:
        raise ValueError(
            f"documents_by_split needs a 'train' split, got {sorted(documents_by_split)}"
        )
    if not documents_by_split["train"]:
        raise ValueError("the 'train' split has no documents")
    check_split_names(documents_by_split)
    check_shard_tokens(shard_tokens)
    out = claim_output(out_dir, PREPARED, overwrite=overwrite, flag="")
    with staged_dir(out, replace=True, last=[META_FILENAME]) as staging:
        return _write_dataset(documents_by_split, tokenizer, staging, source, shard_tokens)


def _write_dataset(documents_by_split: Mapping[str, Sequence[Document]], tokenizer: Tokenizer,
                   out: Path, source: str, shard_tokens: int) -> dict[str, Any]:
    vocab_size = tokenizer.vocab_size
    dtype = token_dtype(vocab_size)
    tokenizer.save(out / TOKENIZER_FILENAME)
    eos = np.asarray([tokenizer.eos_token_id], dtype=dtype)

    indexes: dict[str, dict[str, Any]] = {}
    counts = np.zeros(vocab_size, dtype=np.int64)
    for name, docs in documents_by_split.items():
        writer = SplitWriter(out / name, dtype, int(shard_tokens),
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
        **split_meta(indexes),
        "shard_tokens": int(shard_tokens),
        "source": source,
        "fingerprint": None,
    }
    write_meta(out, meta)
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
    # Ctrl-C reaches the whole process group: the parent stops the pool and reports it in one
    # line, so a worker must not die of it with a traceback of its own.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
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
        tokens[pos + len(e)] = tokenizer.eos_token_id
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
    overwrite: bool = True,
) -> dict[str, Any]:
    """Tokenize corpus files into train / validation / test shards under ``out_dir``.

    Documents are read from ``inputs`` (``.jsonl``, ``.jsonl.xz``, ``.txt`` files and
    directories of them, see :func:`~hybridlm.data.load_documents`), split by the hash of
    their id as :func:`~hybridlm.data.split_documents` does (ordered by that hash within a
    split) and tokenized by ``workers`` processes, each loading the tokenizer from its file.
    The output is byte-identical for any number of workers.

    If ``out_dir/meta.json`` holds the same fingerprint (input paths, sizes and mtimes,
    tokenizer content, fractions, shard size), nothing is done: a line saying so is printed
    and the existing metadata returned. Otherwise an earlier preparation is replaced (with
    ``overwrite``; without it, refused). ``out_dir`` may not be an input, lie inside one or
    hold one, nor hold anything but prepared data.

    Everything is written to a temporary directory beside ``out_dir`` and moved into place
    once complete (:mod:`hybridlm.outputs`): an error, Ctrl-C or SIGKILL leaves ``out_dir`` as
    it was. Tokens first go, in input order, to a temporary file there (about the size of the
    output), then are written to the shards in split order.

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
        overwrite: replace prepared data of other inputs or settings in ``out_dir``.

    Returns:
        The metadata dict written to ``out_dir/meta.json``.

    Raises:
        FileNotFoundError: an input or the tokenizer does not exist.
        ValueError: bad options, malformed input, duplicate ids, or an empty train split;
            :class:`~hybridlm.outputs.OutputError` for an ``out_dir`` it may not write.
    """
    workers = _check_options(val_fraction, test_fraction, shard_tokens, workers)
    paths = _as_path_list(inputs)
    if not paths:
        raise ValueError("no input paths given")
    tok_file = _tokenizer_file(tokenizer)
    # tokenizer.json (+ the tokenizer_config.json naming the eos token of a converted one):
    # what the data is tokenised with, copied into it and part of its fingerprint.
    tok_json = b"".join(path.read_bytes() for path in tokenizer_files(tok_file))
    fingerprint = corpus_fingerprint(paths, tok_json, val_fraction, test_fraction, shard_tokens)
    out = check_output_path(out_dir, flag="")
    check_not_an_input(out, {"--input": paths}, flag="")
    existing = _up_to_date_meta(out, fingerprint)
    if existing is not None:
        print(f"{out} is up to date (fingerprint {fingerprint[:12]}); nothing to do")
        return existing
    claim_output(out, PREPARED, overwrite=overwrite, flag="")

    loaded = Tokenizer.from_file(tok_file)
    files = list_input_files(paths)
    with staged_dir(out, replace=True, last=[META_FILENAME]) as staging:
        for path in tokenizer_files(tok_file):
            copy_file_atomic(path, staging / path.name)
        meta = _write_corpus(paths, files, staging, loaded, workers=workers,
                             shard_tokens=shard_tokens, val_fraction=val_fraction,
                             test_fraction=test_fraction, progress=progress)
        meta["fingerprint"] = fingerprint
        write_meta(staging, meta)
    return meta


def _check_options(val_fraction: float, test_fraction: float, shard_tokens: int,
                   workers: int | None) -> int:
    """Refuse bad options before any file is read; returns the number of workers."""
    check_fractions(val_fraction, test_fraction)
    check_shard_tokens(shard_tokens)
    workers = default_workers() if workers is None else workers
    if not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be an int >= 1, got {workers!r}")
    return workers


def _up_to_date_meta(out: Path, fingerprint: str) -> dict[str, Any] | None:
    """The metadata of complete prepared data in `out` with this fingerprint, else None."""
    existing = read_meta(out)
    if existing is None or existing.get("fingerprint") != fingerprint:
        return None
    try:
        load_prepared(out)
    except (OSError, ValueError):
        return None  # files went missing since: prepare again
    return existing


def _quiet(progress: bool) -> bool | None:
    """tqdm's `disable`: None shows bars on a terminal only, so logs and the one-line error
    of a failed run are not interleaved with progress lines."""
    return None if progress else True


def _write_corpus(paths: list[Path], files: list[Path], out: Path,
                  tokenizer: Tokenizer, *, workers: int, shard_tokens: int, val_fraction: float,
                  test_fraction: float, progress: bool) -> dict[str, Any]:
    """Tokenize the corpus into ``out``, which holds only the tokenizer's files; returns the
    metadata, which the caller writes (``meta.json`` marks the directory complete)."""
    vocab_size = tokenizer.vocab_size
    dtype = token_dtype(vocab_size)
    tmp = out / TMP_TOKENS_FILENAME
    try:
        total, key_hi, key_lo, lengths = _tokenize_into(tmp, paths, files, out, dtype, workers,
                                                        progress)
        try:
            parts = split_indices(key_hi, key_lo, val_fraction, test_fraction)
        except DuplicateKeyError as err:
            raise ValueError(
                f"duplicate document id {_doc_id_at(paths, err.index)!r} in "
                f"{', '.join(map(str, paths))}"
            ) from None
        if parts["train"].size == 0:
            raise ValueError("the 'train' split has no documents")
        indexes, counts = _write_shards(tmp, total, lengths, parts, out, dtype, vocab_size,
                                        shard_tokens, progress)
    finally:
        tmp.unlink(missing_ok=True)
    np.save(out / COUNTS_FILENAME, counts)
    meta: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "vocab_size": vocab_size,
        "dtype": dtype.name,
        "eos_token_id": tokenizer.eos_token_id,
        **split_meta(indexes),
        "shard_tokens": int(shard_tokens),
        "val_fraction": float(val_fraction),
        "test_fraction": float(test_fraction),
        "inputs": [str(p) for p in paths],
        "input_files": len(files),
        "source": ", ".join(str(p) for p in paths),
        "fingerprint": None,
    }
    return meta


def _tokenize_into(tmp: Path, paths: list[Path], files: list[Path], out: Path, dtype: np.dtype,
                   workers: int, progress: bool
                   ) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
    """Every document's tokens, in input order, into the file `tmp` -> (total tokens, the
    split keys hi and lo of each document, each document's length)."""
    sizes = [f.stat().st_size for f in files]
    his, los, lens = [], [], []
    total = 0
    with open(tmp, "wb", buffering=1 << 20) as f, tqdm(
        total=sum(sizes), unit="B", unit_scale=True, desc="tokenize", disable=_quiet(progress),
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
    return total, np.concatenate(his), np.concatenate(los), np.concatenate(lens)


def _write_shards(tmp: Path, total: int, lengths: np.ndarray, parts: dict[str, np.ndarray],
                  out: Path, dtype: np.dtype, vocab_size: int, shard_tokens: int,
                  progress: bool) -> tuple[dict[str, dict[str, Any]], np.ndarray]:
    """The documents of `tmp` into each split's shards, in the split's order -> (each split's
    index, the train split's token counts (V,))."""
    starts = np.cumsum(lengths) - lengths
    # a plain ndarray view of the map: slicing it per document is cheap
    source = np.memmap(tmp, dtype=dtype, mode="r", shape=(total,)).view(np.ndarray)
    indexes: dict[str, dict[str, Any]] = {}
    counts = np.zeros(vocab_size, dtype=np.int64)
    with tqdm(total=total, unit="tok", unit_scale=True, desc="write shards",
              disable=_quiet(progress), mininterval=1.0, dynamic_ncols=True) as bar:
        for name, order in parts.items():
            writer = SplitWriter(out / name, dtype, int(shard_tokens),
                                  vocab_size if name == "train" else None)
            try:
                for s, n in zip(starts[order].tolist(), lengths[order].tolist(), strict=True):
                    writer.add(source[s:s + n])
                    bar.update(n)
                indexes[name] = writer.finish()
            finally:
                writer.abort()
            if writer.counts is not None:
                counts = writer.counts
    return indexes, counts
