"""Sharded split layout, train token counts, document offsets and metadata."""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from hybridlm.data import (
    Document,
    Tokenizer,
    TokenStream,
    load_prepared,
    prepare_dataset,
    token_dtype,
)


def test_prepare_writes_files(prepared_dir: Path, small_splits: dict[str, list[Document]]) -> None:
    for name in ("token_counts.npy", "tokenizer.json", "meta.json"):
        assert (prepared_dir / name).is_file(), name
    meta = json.loads((prepared_dir / "meta.json").read_text())
    assert meta["format_version"] == 2
    assert meta["vocab_size"] == 500
    assert meta["dtype"] == "uint16"
    assert meta["eos_token_id"] == 0
    assert meta["source"] == "demo corpus (truncated)"
    assert meta["documents"] == {k: len(v) for k, v in small_splits.items()}
    for split in ("train", "validation", "test"):
        index = json.loads((prepared_dir / split / "index.json").read_text())
        assert index["num_tokens"] == meta["tokens"][split] > 0
        assert index["num_documents"] == meta["documents"][split]
        assert [s["file"] for s in index["shards"]] == ["shard_00000.bin"]  # default: 2**27
        assert (prepared_dir / split / "shard_00000.bin").stat().st_size == 2 * index[
            "num_tokens"]
        assert (prepared_dir / split / "doc_offsets.npy").is_file()


def test_split_contents(prepared_dir: Path, small_splits: dict[str, list[Document]],
                        small_tokenizer: Tokenizer) -> None:
    data = load_prepared(prepared_dir)
    assert data.splits == ["train", "validation", "test"]
    for name, docs in small_splits.items():
        tokens = data.split(name)
        assert isinstance(tokens, TokenStream) and tokens.dtype == np.uint16
        assert tokens.shape == (data.meta["tokens"][name],) == (len(tokens),)
        arr = tokens.to_numpy()
        assert isinstance(arr, np.memmap)  # a single shard is its memory map
        assert int((arr == 0).sum()) == len(docs)  # one end-of-text per document
        assert tokens[-1] == 0
        offsets = data.doc_offsets(name)
        assert offsets.dtype == np.int64 and offsets.shape == (len(docs),)
        # every document starts right after an end-of-text token
        np.testing.assert_array_equal(offsets, np.concatenate([[0], np.flatnonzero(arr == 0)
                                                               [:-1] + 1]))
    train = data.split("train").to_numpy()
    first_doc = train[: int(np.argmax(train == 0))]
    assert small_tokenizer.decode(first_doc.tolist()) == small_splits["train"][0].text


def test_token_counts(prepared_dir: Path) -> None:
    data = load_prepared(prepared_dir)
    counts = data.token_counts
    train = np.asarray(data.split("train"))
    assert counts.dtype == np.int64 and counts.shape == (data.vocab_size,)
    assert counts.sum() == train.size == data.meta["tokens"]["train"]
    np.testing.assert_array_equal(counts, np.bincount(train, minlength=data.vocab_size))


def test_tokenizer_copy(prepared_dir: Path, small_tokenizer: Tokenizer) -> None:
    data = load_prepared(prepared_dir)
    assert data.tokenizer_path == prepared_dir / "tokenizer.json"
    text = " Fellow-Citizens of the Senate 🙂"
    assert data.load_tokenizer().encode(text) == small_tokenizer.encode(text)


def test_token_dtype() -> None:
    assert token_dtype(500) == np.uint16
    assert token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32
    with pytest.raises(ValueError):
        token_dtype(0)


def test_small_shards(tmp_path: Path, small_splits: dict[str, list[Document]],
                      small_tokenizer: Tokenizer) -> None:
    splits = {"train": small_splits["train"][:40], "validation": small_splits["validation"]}
    whole = prepare_dataset(splits, small_tokenizer, tmp_path / "one")
    meta = prepare_dataset(splits, small_tokenizer, tmp_path / "many", shard_tokens=1000)
    assert meta["tokens"] == whole["tokens"] and meta["shards"]["train"] > 10
    one, many = load_prepared(tmp_path / "one"), load_prepared(tmp_path / "many")
    for name in splits:
        stream = many.split(name)
        assert stream.num_shards == meta["shards"][name]
        sizes = [s["num_tokens"] for s in many.index(name)["shards"]]
        assert max(sizes) <= 1000
        np.testing.assert_array_equal(stream.to_numpy(), one.split(name).to_numpy())
        np.testing.assert_array_equal(many.doc_offsets(name), one.doc_offsets(name))
        # a document no longer than a shard is never cut
        offsets = np.append(many.doc_offsets(name), len(stream))
        shard_of = np.searchsorted(stream.shard_starts, np.arange(len(stream)), side="right")
        for start, end in itertools.pairwise(offsets):
            if end - start <= 1000:
                assert shard_of[start] == shard_of[end - 1]
    np.testing.assert_array_equal(many.token_counts, one.token_counts)


def test_oversized_document_is_cut(tmp_path: Path, small_tokenizer: Tokenizer) -> None:
    long_text = "the whale " * 300  # 600 tokens or more
    docs = [Document("a", "short one"), Document("b", long_text), Document("c", "after")]
    prepare_dataset({"train": docs}, small_tokenizer, tmp_path, shard_tokens=100)
    data = load_prepared(tmp_path)
    sizes = [s["num_tokens"] for s in data.index("train")["shards"]]
    assert all(n <= 100 for n in sizes) and sizes.count(100) >= 5
    expected = np.concatenate([np.asarray([*small_tokenizer.encode(d.text), 0]) for d in docs])
    np.testing.assert_array_equal(data.split("train").to_numpy(), expected)


def test_empty_split_and_custom_names(tmp_path: Path, small_tokenizer: Tokenizer) -> None:
    splits = {"train": [Document("a", "one two three"), Document("b", "four")], "heldout": []}
    meta = prepare_dataset(splits, small_tokenizer, tmp_path / "out")
    assert meta["tokens"]["heldout"] == 0 and meta["documents"]["train"] == 2
    data = load_prepared(tmp_path / "out")
    assert len(data.split("heldout")) == 0 and data.split("heldout").to_numpy().size == 0
    assert data.doc_offsets("heldout").shape == (0,)
    assert len(data.split("train")) == meta["tokens"]["train"]
    np.testing.assert_array_equal(data.doc_offsets("train"),
                                  [0, len(small_tokenizer.encode("one two three")) + 1])


def test_prepare_replaces_earlier_output(tmp_path: Path, small_tokenizer: Tokenizer) -> None:
    docs = [Document(str(i), "a fairly long sentence about ships " * 5) for i in range(8)]
    prepare_dataset({"train": docs}, small_tokenizer, tmp_path, shard_tokens=50)
    assert len(list((tmp_path / "train").glob("shard_*.bin"))) > 5
    prepare_dataset({"train": docs[:1]}, small_tokenizer, tmp_path)
    assert [p.name for p in (tmp_path / "train").glob("shard_*.bin")] == ["shard_00000.bin"]
    assert load_prepared(tmp_path).meta["documents"] == {"train": 1}


def test_prepare_errors(tmp_path: Path, small_tokenizer: Tokenizer) -> None:
    with pytest.raises(ValueError, match="'train'"):
        prepare_dataset({"validation": [Document("a", "x")]}, small_tokenizer, tmp_path)
    with pytest.raises(ValueError, match="no documents"):
        prepare_dataset({"train": []}, small_tokenizer, tmp_path)
    with pytest.raises(ValueError, match="shard_tokens"):
        prepare_dataset({"train": [Document("a", "x")]}, small_tokenizer, tmp_path,
                        shard_tokens=0)
    with pytest.raises(ValueError, match="invalid split name"):
        prepare_dataset({"train": [Document("a", "x")], "../x": []}, small_tokenizer, tmp_path)


def test_load_prepared_errors(tmp_path: Path, prepared_dir: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not found"):
        load_prepared(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match=r"is not a prepared data directory \(no "
                                                r"meta\.json, no splits\)"):
        load_prepared(tmp_path)
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "index.json").write_text("{}")
    with pytest.raises(FileNotFoundError,
                       match=r"meta\.json missing: preparation did not finish.*"
                             r"token_counts\.npy, tokenizer\.json"):
        load_prepared(tmp_path)
    broken = tmp_path / "broken"
    shutil.copytree(prepared_dir, broken)
    (broken / "meta.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"meta\.json missing: preparation did not"):
        load_prepared(broken)
    shutil.copy(prepared_dir / "meta.json", broken / "meta.json")
    (broken / "validation" / "shard_00000.bin").unlink()
    (broken / "test" / "index.json").unlink()
    with pytest.raises(FileNotFoundError,
                       match=r"missing: validation/shard_00000\.bin, test/index\.json"):
        load_prepared(broken)
    shutil.rmtree(broken)
    shutil.copytree(prepared_dir, broken)
    with open(broken / "train" / "shard_00000.bin", "ab") as f:
        f.write(b"\0\0")
    with pytest.raises(ValueError, match="holds .* bytes"):
        load_prepared(broken)
    with pytest.raises(KeyError, match="unknown split"):
        load_prepared(prepared_dir).split("dev")


def test_reads_single_file_layout(tmp_path: Path) -> None:
    """Directories written before the sharded layout still open."""
    train = np.arange(50, dtype=np.uint16) % 7
    train.tofile(tmp_path / "train.bin")
    np.save(tmp_path / "token_counts.npy", np.bincount(train, minlength=7).astype(np.int64))
    (tmp_path / "tokenizer.json").write_text("{}")
    meta = {"format_version": 1, "vocab_size": 7, "dtype": "uint16", "eos_token_id": 0,
            "splits": ["train"], "tokens": {"train": 50}, "documents": {"train": 8}}
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    data = load_prepared(tmp_path)
    np.testing.assert_array_equal(data.split("train").to_numpy(), train)
    with pytest.raises(ValueError, match="document offsets"):
        data.doc_offsets("train")
