"""Corpus loading and deterministic document splits."""

from __future__ import annotations

import json
import lzma
import random
from pathlib import Path

import pytest

from hybridlm.data import DEMO_CORPUS, Document, demo_corpus_path, load_documents, split_documents


def test_demo_corpus_is_shipped_in_repo_data_dir() -> None:
    assert DEMO_CORPUS.name == "demo_corpus.jsonl.xz"
    assert DEMO_CORPUS.parent.name == "data"
    assert (DEMO_CORPUS.parent.parent / "src" / "hybridlm" / "data").is_dir()
    assert demo_corpus_path() == DEMO_CORPUS
    assert DEMO_CORPUS.stat().st_size < 10 * 1024 * 1024


def test_demo_corpus_documents(demo_docs: list[Document]) -> None:
    ids = [d.id for d in demo_docs]
    assert len(ids) == len(set(ids)) > 400
    assert ids == sorted(ids)
    assert {d.source for d in demo_docs} == {"sotu", "moby-dick", "kjv"}
    assert all(d.text.strip() and d.title for d in demo_docs)
    by_id = {d.id: d for d in demo_docs}
    assert by_id["moby-dick-001"].text.startswith("Call me Ishmael.")
    assert by_id["kjv-01-genesis"].text.startswith("Genesis\n\nChapter 1\n\nIn the beginning")
    assert "sotu-1790-washington" in by_id and "sotu-2021-biden" in by_id
    assert sum(len(d.text) for d in demo_docs) > 10_000_000


def test_split_deterministic_disjoint_nonempty(demo_docs: list[Document]) -> None:
    splits = split_documents(demo_docs)
    assert list(splits) == ["train", "validation", "test"]
    ids = {name: [d.id for d in docs] for name, docs in splits.items()}
    assert all(ids[name] for name in ids)
    assert not set(ids["train"]) & set(ids["validation"])
    assert not set(ids["train"]) & set(ids["test"])
    assert not set(ids["validation"]) & set(ids["test"])
    assert sorted(i for split_ids in ids.values() for i in split_ids) == sorted(
        d.id for d in demo_docs
    )
    assert 0.02 < len(ids["validation"]) / len(demo_docs) < 0.10
    again = split_documents(list(demo_docs))
    assert {k: [d.id for d in v] for k, v in again.items()} == ids


def test_split_order_independent(demo_docs: list[Document]) -> None:
    shuffled = list(demo_docs)
    random.Random(0).shuffle(shuffled)
    a, b = split_documents(demo_docs), split_documents(shuffled)
    for name in a:
        assert [d.id for d in a[name]] == [d.id for d in b[name]]


def test_split_membership_depends_only_on_id(demo_docs: list[Document]) -> None:
    full = split_documents(demo_docs)
    half = split_documents(demo_docs[::2])
    for name in full:
        assert {d.id for d in half[name]} <= {d.id for d in full[name]}


def test_split_small_corpus_gets_heldout_docs() -> None:
    docs = [Document(id=f"doc{i}", text=f"text {i}") for i in range(5)]
    splits = split_documents(docs)
    assert all(splits[name] for name in splits)
    assert sum(len(v) for v in splits.values()) == 5
    assert split_documents(docs, val_fraction=0.0, test_fraction=0.0)["validation"] == []


@pytest.mark.parametrize("kwargs", [{"val_fraction": -0.1}, {"test_fraction": 1.0},
                                    {"val_fraction": 0.6, "test_fraction": 0.5}])
def test_split_bad_fractions(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="fraction"):
        split_documents([Document("a", "x")], **kwargs)


def test_split_duplicate_ids() -> None:
    with pytest.raises(ValueError, match="duplicate"):
        split_documents([Document("a", "x"), Document("a", "y")])


def test_load_txt_file_and_directory(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.txt").write_text("second  doc\n", encoding="utf-8")
    (tmp_path / "a.txt").write_text("first doc 🙂", encoding="utf-8")
    (tmp_path / "sub" / "c.txt").write_text("third", encoding="utf-8")
    (tmp_path / "empty.txt").write_text("  \n", encoding="utf-8")
    (tmp_path / "notes.md").write_text("ignored", encoding="utf-8")
    docs = load_documents(tmp_path)
    assert [d.id for d in docs] == ["a", "b", "sub/c"]
    assert docs[0].text == "first doc 🙂" and docs[1].text == "second  doc\n"
    single = load_documents(tmp_path / "a.txt")
    assert single == [Document(id="a", text="first doc 🙂", source="a", title="a")]


def test_load_jsonl_and_xz(tmp_path: Path) -> None:
    rows = [{"id": "x1", "source": "s", "title": "T", "text": "hello"}, {"text": "no id"}]
    body = "\n".join(json.dumps(r) for r in rows) + "\n\n"
    (tmp_path / "c.jsonl").write_text(body, encoding="utf-8")
    with lzma.open(tmp_path / "c2.jsonl.xz", "wt", encoding="utf-8") as f:
        f.write(body)
    plain = load_documents(tmp_path / "c.jsonl")
    assert plain == [Document("x1", "hello", "s", "T"), Document("c-2", "no id", "c", "")]
    assert [d.text for d in load_documents(tmp_path / "c2.jsonl.xz")] == ["hello", "no id"]


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_documents(tmp_path / "missing.jsonl")
    with pytest.raises(ValueError, match=r"no \.txt"):
        load_documents(tmp_path)
    (tmp_path / "empty.jsonl").write_text("\n", encoding="utf-8")
    with pytest.raises(ValueError, match="no non-empty documents"):
        load_documents(tmp_path / "empty.jsonl")
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{oops\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad.jsonl:2"):
        load_documents(tmp_path / "bad.jsonl")
    (tmp_path / "notext.jsonl").write_text('{"body": "x"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match="'text'"):
        load_documents(tmp_path / "notext.jsonl")
    (tmp_path / "dup.jsonl").write_text('{"id": 1, "text": "a"}\n{"id": 1, "text": "b"}\n')
    with pytest.raises(ValueError, match="duplicate"):
        load_documents(tmp_path / "dup.jsonl")
    (tmp_path / "data.csv").write_text("a,b\n", encoding="utf-8")
    with pytest.raises(ValueError, match="unsupported"):
        load_documents(tmp_path / "data.csv")
