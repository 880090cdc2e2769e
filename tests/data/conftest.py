"""Corpus files on disk for the preparation tests."""

from __future__ import annotations

import json
import lzma
from pathlib import Path

import pytest

from hybridlm.data import Document, Tokenizer


@pytest.fixture(scope="session")
def tokenizer_file(tmp_path_factory: pytest.TempPathFactory, small_tokenizer: Tokenizer) -> Path:
    return small_tokenizer.save(tmp_path_factory.mktemp("tok") / "tokenizer.json")


@pytest.fixture(scope="session")
def corpus_inputs(tmp_path_factory: pytest.TempPathFactory,
                  demo_docs: list[Document]) -> list[Path]:
    """Two inputs: a .jsonl file, and a directory of .txt files and a .jsonl.xz file.

    About 90 documents of at most 1500 characters, one .txt document of about 6000
    characters (longer than the small shards the tests use), an entry without an id and a
    whitespace-only entry (dropped).
    """
    root = tmp_path_factory.mktemp("corpus")
    lines = [json.dumps({"id": d.id, "text": d.text[:1500], "source": d.source})
             for d in demo_docs[::6][:60]]
    lines.append(json.dumps({"id": "blank", "text": "  \n "}))
    (root / "a.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    folder = root / "more"
    (folder / "sub").mkdir(parents=True)
    extra = demo_docs[1::6][:25]
    (folder / "long.txt").write_text(extra[0].text[:6000], encoding="utf-8")
    (folder / "sub" / "short.txt").write_text(extra[1].text[:800], encoding="utf-8")
    rows = [{"id": d.id, "text": d.text[:1200]} for d in extra[2:]]
    rows.append({"text": "A document without an id, one of a kind."})
    with lzma.open(folder / "c.jsonl.xz", "wt", encoding="utf-8") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
    return [root / "a.jsonl", folder]
