"""Tokenized split files, train token counts and metadata."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from hybridlm.data import (
    Document,
    Tokenizer,
    load_prepared,
    prepare_dataset,
    token_dtype,
)


def test_prepare_writes_files(prepared_dir: Path, small_splits: dict[str, list[Document]]) -> None:
    for name in ("train.bin", "validation.bin", "test.bin", "token_counts.npy", "tokenizer.json",
                 "meta.json"):
        assert (prepared_dir / name).is_file(), name
    meta = json.loads((prepared_dir / "meta.json").read_text())
    assert meta["vocab_size"] == 500
    assert meta["dtype"] == "uint16"
    assert meta["eos_token_id"] == 0
    assert meta["source"] == "demo corpus (truncated)"
    assert meta["documents"] == {k: len(v) for k, v in small_splits.items()}
    for split in ("train", "validation", "test"):
        assert (prepared_dir / f"{split}.bin").stat().st_size == 2 * meta["tokens"][split] > 0


def test_split_contents(prepared_dir: Path, small_splits: dict[str, list[Document]],
                        small_tokenizer: Tokenizer) -> None:
    data = load_prepared(prepared_dir)
    assert data.splits == ["train", "validation", "test"]
    for name, docs in small_splits.items():
        tokens = data.split(name)
        assert isinstance(tokens, np.memmap) and tokens.dtype == np.uint16
        assert tokens.shape == (data.meta["tokens"][name],)
        assert int((tokens == 0).sum()) == len(docs)  # one end-of-text per document
        assert tokens[-1] == 0
    train = np.asarray(data.split("train"))
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


def test_empty_split_and_custom_names(tmp_path: Path, small_tokenizer: Tokenizer) -> None:
    splits = {"train": [Document("a", "one two three"), Document("b", "four")], "heldout": []}
    meta = prepare_dataset(splits, small_tokenizer, tmp_path / "out")
    assert meta["tokens"]["heldout"] == 0 and meta["documents"]["train"] == 2
    data = load_prepared(tmp_path / "out")
    assert data.split("heldout").size == 0
    assert data.split("train").size == meta["tokens"]["train"]


def test_prepare_errors(tmp_path: Path, small_tokenizer: Tokenizer) -> None:
    with pytest.raises(ValueError, match="'train'"):
        prepare_dataset({"validation": [Document("a", "x")]}, small_tokenizer, tmp_path)
    with pytest.raises(ValueError, match="no documents"):
        prepare_dataset({"train": []}, small_tokenizer, tmp_path)


def test_load_prepared_errors(tmp_path: Path, prepared_dir: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not found"):
        load_prepared(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match=r"meta\.json.*token_counts\.npy.*tokenizer\.json"):
        load_prepared(tmp_path)
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("meta.json", "token_counts.npy", "tokenizer.json", "train.bin"):
        (broken / name).write_bytes((prepared_dir / name).read_bytes())
    with pytest.raises(FileNotFoundError, match=r"validation\.bin, test\.bin"):
        load_prepared(broken)
    with pytest.raises(KeyError, match="unknown split"):
        load_prepared(prepared_dir).split("dev")
