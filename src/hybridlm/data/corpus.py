"""Documents: loading a corpus from disk and splitting it into train / validation / test.

Accepted inputs for :func:`load_documents`:

* ``*.jsonl`` or ``*.jsonl.xz``: one JSON object per line with a ``"text"`` field and optional
  ``"id"``, ``"source"`` and ``"title"`` fields (the format of the shipped demo corpus);
* ``*.txt``: the whole file is one document;
* a directory: every ``*.txt``, ``*.jsonl`` and ``*.jsonl.xz`` file below it, in sorted order.
"""

from __future__ import annotations

import hashlib
import json
import lzma
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

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


def _read_jsonl(path: Path, default_source: str) -> Iterator[Document]:
    opener = lzma.open if path.name.endswith(".xz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: invalid JSON ({exc.msg})") from exc
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise ValueError(f"{path}:{lineno}: expected an object with a string 'text' field")
            yield Document(
                id=str(obj.get("id", f"{_stem(path)}-{lineno}")),
                text=obj["text"],
                source=str(obj.get("source", default_source)),
                title=str(obj.get("title", "")),
            )


def _read_txt(path: Path, doc_id: str, source: str) -> Document:
    return Document(id=doc_id, text=path.read_text(encoding="utf-8"), source=source,
                    title=path.stem)


def _iter_path(path: Path) -> Iterator[Document]:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*")
                       if p.is_file() and (p.suffix == ".txt" or _is_jsonl(p)))
        if not files:
            raise ValueError(f"no .txt, .jsonl or .jsonl.xz files found under {path}")
        for file in files:
            rel = file.relative_to(path).as_posix()
            if _is_jsonl(file):
                yield from _read_jsonl(file, default_source=path.name)
            else:
                yield _read_txt(file, doc_id=rel[: -len(".txt")], source=path.name)
    elif _is_jsonl(path):
        yield from _read_jsonl(path, default_source=_stem(path))
    elif path.suffix == ".txt":
        yield _read_txt(path, doc_id=path.stem, source=path.stem)
    else:
        raise ValueError(
            f"unsupported corpus file {path}: expected .jsonl, .jsonl.xz, .txt or a directory"
        )


def load_documents(path: str | Path) -> list[Document]:
    """Load the documents stored at ``path`` (see the module docstring for accepted formats).

    Documents whose text is empty or whitespace-only are dropped.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: unsupported file type, malformed JSON lines, duplicate ids, or no
            non-empty document at all.
    """
    path = Path(path)
    if not path.exists():
        hint = ""
        if path == DEMO_CORPUS:
            hint = " (rebuild it with `python scripts/build_demo_corpus.py`)"
        raise FileNotFoundError(f"corpus path does not exist: {path}{hint}")
    docs = [d for d in _iter_path(path) if d.text.strip()]
    if not docs:
        raise ValueError(f"corpus at {path} contains no non-empty documents")
    seen: set[str] = set()
    for doc in docs:
        if doc.id in seen:
            raise ValueError(f"duplicate document id {doc.id!r} in {path}")
        seen.add(doc.id)
    return docs


def _unit_hash(doc_id: str) -> float:
    """Map an id to a uniform number in [0, 1) via the first 8 bytes of its sha256."""
    digest = hashlib.sha256(doc_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def split_documents(
    docs: Iterable[Document], val_fraction: float = 0.05, test_fraction: float = 0.05
) -> dict[str, list[Document]]:
    """Split documents into ``"train"``, ``"validation"`` and ``"test"`` by hashing their ids.

    A document goes to test when ``u < test_fraction``, to validation when
    ``u < test_fraction + val_fraction`` and to train otherwise, where ``u`` in [0, 1) is
    derived from ``sha256(id)``. The result depends only on the set of documents, not on their
    order; within a split documents are ordered by ``u`` (a stable, source-mixing shuffle).
    If a split with a positive fraction comes out empty while train has at least two
    documents, the train document with the smallest ``u`` is moved into it, so small corpora
    still get a held-out document.

    Raises:
        ValueError: a fraction outside [0, 1), fractions summing to >= 1, or duplicate ids.
    """
    for name, frac in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= frac < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {frac}")
    if val_fraction + test_fraction >= 1.0:
        raise ValueError(
            f"val_fraction + test_fraction must be < 1, got {val_fraction + test_fraction}"
        )
    keyed: list[tuple[float, str, Document]] = []
    seen: set[str] = set()
    for doc in docs:
        if doc.id in seen:
            raise ValueError(f"duplicate document id {doc.id!r}")
        seen.add(doc.id)
        keyed.append((_unit_hash(doc.id), doc.id, doc))
    keyed.sort(key=lambda item: (item[0], item[1]))

    buckets: dict[str, list[tuple[float, str, Document]]] = {name: [] for name in SPLITS}
    for item in keyed:
        u = item[0]
        name = "test" if u < test_fraction else (
            "validation" if u < test_fraction + val_fraction else "train")
        buckets[name].append(item)
    for name, frac in (("validation", val_fraction), ("test", test_fraction)):
        if frac > 0 and not buckets[name] and len(buckets["train"]) >= 2:
            buckets[name].append(buckets["train"].pop(0))
    return {name: [doc for _, _, doc in buckets[name]] for name in SPLITS}
