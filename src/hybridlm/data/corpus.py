"""Documents: loading a corpus from disk and splitting it into train / validation / test.

Accepted inputs for :func:`load_documents`:

* ``*.jsonl`` or ``*.jsonl.xz``: one JSON object per line with a ``"text"`` field and optional
  ``"id"``, ``"source"`` and ``"title"`` fields (the format of the shipped demo corpus);
* ``*.txt``: the whole file is one document;
* a directory: every ``*.txt``, ``*.jsonl`` and ``*.jsonl.xz`` file below it, in sorted order.
"""

from __future__ import annotations

import hashlib
import io
import json
import lzma
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DEMO_CORPUS: Path = Path(__file__).resolve().parents[3] / "data" / "demo_corpus.jsonl.xz"
"""The shipped demo corpus (State of the Union addresses, Moby-Dick, King James Bible)."""

SPLITS: tuple[str, str, str] = ("train", "validation", "test")
_JSONL_SUFFIXES = (".jsonl", ".jsonl.xz")


@dataclass(frozen=True)
class Document:
    """One document of a corpus.

    Attributes:
        id: unique identifier; also decides the split the document falls in.
        text: the document text.
        source: short name of the collection it came from (e.g. ``"sotu"``).
        title: human-readable title.
    """

    id: str
    text: str
    source: str = ""
    title: str = ""


def demo_corpus_path() -> Path:
    """Return :data:`DEMO_CORPUS`, raising a clear ``FileNotFoundError`` if it is missing."""
    if not DEMO_CORPUS.is_file():
        raise FileNotFoundError(
            f"demo corpus not found at {DEMO_CORPUS}. It ships in the repository's data/ folder "
            "(use a source checkout or an editable install); rebuild it with "
            "`python scripts/build_demo_corpus.py`."
        )
    return DEMO_CORPUS


def _is_jsonl(path: Path) -> bool:
    return path.name.endswith(_JSONL_SUFFIXES)


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (".jsonl.xz", ".jsonl", ".txt"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def unreadable_text(path: Path, err: Exception, where: str = "") -> ValueError:
    """The one-line error for a corpus file that cannot be read as (xz-compressed) UTF-8
    text: `err` is what decoding raised, `where` says how far reading got."""
    if isinstance(err, UnicodeDecodeError):
        what = (f"is not UTF-8 text (byte 0x{err.object[err.start]:02x}{where}): a binary "
                "file, or text in another encoding")
    elif isinstance(err, EOFError):
        what = f"is truncated: the xz stream ends early{where}"
    else:  # lzma.LZMAError
        what = f"is not a valid xz file ({err}{where})"
    return ValueError(f"{path} {what}")


def _jsonl_lines(path: Path) -> Iterator[tuple[int, str, int]]:
    """(line number, line, file bytes read so far) of a .jsonl or .jsonl.xz file; a file that
    is not UTF-8, or a damaged or truncated xz stream, raises ValueError naming the file."""
    lineno = 0
    with open(path, "rb") as raw:
        stream = lzma.open(raw) if path.name.endswith(".xz") else raw
        with io.TextIOWrapper(stream, encoding="utf-8") as f:
            try:
                for lineno, line in enumerate(f, start=1):
                    yield lineno, line, raw.tell()
            except (UnicodeDecodeError, EOFError, lzma.LZMAError) as err:
                where = f", after line {lineno}" if lineno else ""
                raise unreadable_text(path, err, where) from None


def lone_surrogate(line: str, obj: object) -> str | None:
    """The first lone UTF-16 surrogate (an escape like \\ud800 without its pair) in the strings
    of `obj`, parsed from the JSON text `line`: valid JSON, but not Unicode text, and no
    tokenizer takes it. Only lines holding such an escape are searched."""
    if "\\ud" not in line and "\\uD" not in line:
        return None
    try:
        json.dumps(obj, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as err:
        return f"\\u{ord(err.object[err.start]):04x}"
    return None


def parse_json_line(line: str, where: str) -> object:
    """One JSON-lines record; invalid JSON or a lone surrogate escape raises ValueError
    starting with `where` (the file and line)."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{where}: invalid JSON ({exc.msg})") from None
    surrogate = lone_surrogate(line, obj)
    if surrogate is not None:
        raise ValueError(f"{where}: holds the lone surrogate {surrogate}, which is not "
                         "Unicode text")
    return obj


def _describe_record(obj: object) -> str:
    if not isinstance(obj, dict):
        return f"a JSON {type(obj).__name__}"
    if "text" not in obj:
        return f"an object without 'text' (keys: {sorted(obj)[:8]})"
    return f"'text' of type {type(obj['text']).__name__}"


def _read_jsonl(path: Path, default_source: str) -> Iterator[tuple[Document, int]]:
    """Documents of a JSON-lines file, each with the number of file bytes read so far."""
    for lineno, line, pos in _jsonl_lines(path):
        if not line.strip():
            continue
        obj = parse_json_line(line, f"{path}:{lineno}")
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            raise ValueError(f"{path}:{lineno}: expected an object with a string 'text' "
                             f"field, got {_describe_record(obj)}")
        doc = Document(
            id=str(obj.get("id", f"{_stem(path)}-{lineno}")),
            text=obj["text"],
            source=str(obj.get("source", default_source)),
            title=str(obj.get("title", "")),
        )
        yield doc, pos


def _read_txt(path: Path, doc_id: str, source: str) -> Document:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise unreadable_text(path, err, f" at offset {err.start}") from None
    return Document(id=doc_id, text=text, source=source, title=path.stem)


def _as_paths(paths: str | Path | Iterable[str | Path]) -> list[Path]:
    if isinstance(paths, (str, Path)):
        return [Path(paths)]
    out = [Path(p) for p in paths]
    if not out:
        raise ValueError("no corpus paths given")
    return out


def _expand(path: Path) -> list[tuple[Path, Path | None]]:
    """(file, root directory or None) pairs for one input path, directories in sorted order."""
    if not path.exists():
        hint = ""
        if path == DEMO_CORPUS:
            hint = " (rebuild it with `python scripts/build_demo_corpus.py`)"
        raise FileNotFoundError(f"corpus path does not exist: {path}{hint}")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*")
                       if p.is_file() and (p.suffix == ".txt" or _is_jsonl(p)))
        if not files:
            raise ValueError(f"no .txt, .jsonl or .jsonl.xz files found under {path}")
        return [(file, path) for file in files]
    if _is_jsonl(path) or path.suffix == ".txt":
        return [(path, None)]
    raise ValueError(
        f"unsupported corpus file {path}: expected .jsonl, .jsonl.xz, .txt or a directory"
    )


def list_input_files(paths: str | Path | Iterable[str | Path]) -> list[Path]:
    """Every corpus file read for ``paths`` (files and directories), in reading order.

    Raises:
        FileNotFoundError: a path does not exist.
        ValueError: an unsupported file type, or a directory without corpus files.
    """
    return [file for path in _as_paths(paths) for file, _ in _expand(path)]


def iter_input(
    paths: str | Path | Iterable[str | Path],
) -> Iterator[tuple[Document, int, int]]:
    """Stream ``(document, file_number, bytes_read_in_file)`` over all inputs, in order.

    ``file_number`` indexes :func:`list_input_files`; ``bytes_read_in_file`` is how far the
    reader got in that (possibly compressed) file, for progress reporting. Documents whose
    text is empty or whitespace-only are skipped; duplicate ids are not checked here.
    """
    expanded = [pair for path in _as_paths(paths) for pair in _expand(path)]
    for number, (file, root) in enumerate(expanded):
        if _is_jsonl(file):
            source = root.name if root is not None else _stem(file)
            for doc, pos in _read_jsonl(file, default_source=source):
                if doc.text.strip():
                    yield doc, number, pos
        else:
            if root is not None:
                doc_id, source = file.relative_to(root).as_posix()[: -len(".txt")], root.name
            else:
                doc_id, source = file.stem, file.stem
            doc = _read_txt(file, doc_id=doc_id, source=source)
            if doc.text.strip():
                yield doc, number, file.stat().st_size


def load_documents(paths: str | Path | Iterable[str | Path]) -> list[Document]:
    """Load the documents stored at ``paths``: one path or several (see the module docstring
    for accepted formats), read in the given order.

    Documents whose text is empty or whitespace-only are dropped.

    Raises:
        FileNotFoundError: a path does not exist.
        ValueError: unsupported file type, malformed JSON lines, duplicate ids, or no
            non-empty document at all.
    """
    where = ", ".join(str(p) for p in _as_paths(paths))
    docs = [doc for doc, _, _ in iter_input(paths)]
    if not docs:
        raise ValueError(f"corpus at {where} contains no non-empty documents")
    seen: set[str] = set()
    for doc in docs:
        if doc.id in seen:
            raise ValueError(f"duplicate document id {doc.id!r} in {where}")
        seen.add(doc.id)
    return docs


def doc_key(doc_id: str) -> tuple[int, int]:
    """The split key of a document id: the first two 8-byte big-endian words of sha256(id)."""
    digest = hashlib.sha256(doc_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big"), int.from_bytes(digest[8:16], "big")


def check_fractions(val_fraction: float, test_fraction: float) -> None:
    """Raise ``ValueError`` unless both fractions are in [0, 1) and sum to less than 1."""
    for name, frac in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= frac < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {frac}")
    if val_fraction + test_fraction >= 1.0:
        raise ValueError(
            f"val_fraction + test_fraction must be < 1, got {val_fraction + test_fraction}"
        )


class DuplicateKeyError(ValueError):
    """Two documents share a split key (in practice: the same id). ``index`` is the position
    (in input order) of the later one."""

    def __init__(self, index: int) -> None:
        super().__init__(f"duplicate document id (document #{index})")
        self.index = index


def split_indices(
    key_hi: np.ndarray, key_lo: np.ndarray, val_fraction: float = 0.05,
    test_fraction: float = 0.05,
) -> dict[str, np.ndarray]:
    """Assign documents to splits from their :func:`doc_key` words (arrays of uint64).

    Returns, per split name, the int64 positions of its documents ordered by key. See
    :func:`split_documents` for the rule.

    Raises:
        ValueError: invalid fractions; :class:`DuplicateKeyError` for repeated keys.
    """
    check_fractions(val_fraction, test_fraction)
    hi = np.asarray(key_hi, dtype=np.uint64).reshape(-1)
    lo = np.asarray(key_lo, dtype=np.uint64).reshape(-1)
    order = np.lexsort((lo, hi)).astype(np.int64)
    hi_sorted, lo_sorted = hi[order], lo[order]
    same = (hi_sorted[1:] == hi_sorted[:-1]) & (lo_sorted[1:] == lo_sorted[:-1])
    if same.any():
        j = int(np.flatnonzero(same)[0])
        raise DuplicateKeyError(int(max(order[j], order[j + 1])))
    u = hi_sorted.astype(np.float64) / 2.0**64
    is_test = u < test_fraction
    is_val = ~is_test & (u < test_fraction + val_fraction)
    out = {
        "train": order[~is_test & ~is_val],
        "validation": order[is_val],
        "test": order[is_test],
    }
    for name, frac in (("validation", val_fraction), ("test", test_fraction)):
        if frac > 0 and out[name].size == 0 and out["train"].size >= 2:
            out[name], out["train"] = out["train"][:1], out["train"][1:]
    return {name: out[name] for name in SPLITS}


def split_documents(
    docs: Iterable[Document], val_fraction: float = 0.05, test_fraction: float = 0.05
) -> dict[str, list[Document]]:
    """Split documents into ``"train"``, ``"validation"`` and ``"test"`` by hashing their ids.

    A document goes to test when ``u < test_fraction``, to validation when
    ``u < test_fraction + val_fraction`` and to train otherwise, where ``u`` in [0, 1) is
    the first 8 bytes of ``sha256(id)`` over ``2**64``. The result depends only on the set of
    documents, not on their order; within a split documents are ordered by ``sha256(id)`` (a
    stable, source-mixing shuffle). If a split with a positive fraction comes out empty while
    train has at least two documents, the train document with the smallest hash is moved into
    it, so small corpora still get a held-out document.

    Raises:
        ValueError: a fraction outside [0, 1), fractions summing to >= 1, or duplicate ids.
    """
    check_fractions(val_fraction, test_fraction)
    docs = list(docs)
    keys = np.array([doc_key(d.id) for d in docs], dtype=np.uint64).reshape(-1, 2)
    try:
        parts = split_indices(keys[:, 0], keys[:, 1], val_fraction, test_fraction)
    except DuplicateKeyError as err:
        raise ValueError(f"duplicate document id {docs[err.index].id!r}") from None
    return {name: [docs[i] for i in idx.tolist()] for name, idx in parts.items()}
