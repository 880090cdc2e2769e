"""`prepare_corpus` / `hybridlm data prepare`: corpus files -> token shards, with workers."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from hybridlm.cli import main
from hybridlm.data import (
    SPLITS,
    Tokenizer,
    load_documents,
    load_prepared,
    prepare_corpus,
    prepare_dataset,
    split_documents,
)

SHARD = 2000  # small shards: every split of the test corpus spans several


def _files(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes()
            for p in sorted(out.rglob("*")) if p.is_file()}


def _mtimes(out: Path) -> dict[str, int]:
    return {p.relative_to(out).as_posix(): p.stat().st_mtime_ns
            for p in sorted(out.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def one_worker(tmp_path_factory: pytest.TempPathFactory, corpus_inputs: list[Path],
               tokenizer_file: Path) -> Path:
    out = tmp_path_factory.mktemp("prep") / "w1"
    prepare_corpus(corpus_inputs, tokenizer_file, out, workers=1, shard_tokens=SHARD,
                   progress=False)
    return out


def test_layout(one_worker: Path, corpus_inputs: list[Path]) -> None:
    data = load_prepared(one_worker)
    meta = data.meta
    assert meta["splits"] == list(SPLITS) and meta["dtype"] == "uint16"
    assert meta["shard_tokens"] == SHARD and len(meta["fingerprint"]) == 64
    assert meta["inputs"] == [str(p) for p in corpus_inputs] and meta["input_files"] == 4
    assert sum(meta["documents"].values()) == 60 + 2 + 23 + 1  # the blank entry is dropped
    assert meta["shards"]["train"] > 10
    for name in SPLITS:
        index = json.loads((one_worker / name / "index.json").read_text())
        files = sorted(p.name for p in (one_worker / name).glob("shard_*.bin"))
        assert [s["file"] for s in index["shards"]] == files
        assert files == [f"shard_{i:05d}.bin" for i in range(len(files))]
        for shard in index["shards"]:
            assert 0 < shard["num_tokens"] <= SHARD
            assert (one_worker / name / shard["file"]).stat().st_size == 2 * shard["num_tokens"]
        assert sum(s["num_tokens"] for s in index["shards"]) == meta["tokens"][name]
    assert not list(one_worker.glob(".*"))  # the temporary token file is gone


def test_same_as_in_memory_preparation(tmp_path: Path, one_worker: Path,
                                       corpus_inputs: list[Path], tokenizer_file: Path) -> None:
    """Split, order, tokens, offsets and counts equal split_documents + prepare_dataset."""
    splits = split_documents(load_documents(corpus_inputs))
    prepare_dataset(splits, Tokenizer.from_file(tokenizer_file), tmp_path, shard_tokens=SHARD)
    ours, ref = _files(one_worker), _files(tmp_path)
    assert sorted(ours) == sorted(ref)
    for name in ours:
        if name not in ("meta.json", "tokenizer.json"):
            assert ours[name] == ref[name], name
    assert ours["tokenizer.json"] == tokenizer_file.read_bytes()


def test_counts_and_doc_offsets(one_worker: Path, corpus_inputs: list[Path],
                                tokenizer_file: Path) -> None:
    data = load_prepared(one_worker)
    train = data.split("train").to_numpy()
    np.testing.assert_array_equal(data.token_counts,
                                  np.bincount(train, minlength=data.vocab_size))
    tokenizer = Tokenizer.from_file(tokenizer_file)
    splits = split_documents(load_documents(corpus_inputs))
    for name in SPLITS:
        stream, offsets = data.split(name), data.doc_offsets(name)
        assert offsets.shape == (len(splits[name]),)
        ends = np.append(offsets[1:], len(stream))
        for doc, start, end in zip(splits[name], offsets, ends, strict=True):
            ids = stream[int(start):int(end)]
            assert ids[-1] == 0
            assert tokenizer.decode(ids[:-1].tolist()) == doc.text


def test_workers_give_identical_output(tmp_path: Path, one_worker: Path,
                                       corpus_inputs: list[Path], tokenizer_file: Path) -> None:
    prepare_corpus(corpus_inputs, tokenizer_file, tmp_path, workers=2, shard_tokens=SHARD,
                   progress=False)
    assert _files(tmp_path) == _files(one_worker)


def test_rerun_is_a_no_op_until_something_changes(
    tmp_path: Path, one_worker: Path, corpus_inputs: list[Path], tokenizer_file: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    inputs = [tmp_path / "a.jsonl", tmp_path / "more"]
    shutil.copy2(corpus_inputs[0], inputs[0])
    shutil.copytree(corpus_inputs[1], inputs[1])
    out = tmp_path / "out"
    shutil.copytree(one_worker, out)
    meta = prepare_corpus(inputs, tokenizer_file, out, workers=1, shard_tokens=SHARD,
                          progress=False)  # the inputs moved: prepared again
    before = _mtimes(out)
    capsys.readouterr()
    again = prepare_corpus(inputs, tokenizer_file, out, workers=3, shard_tokens=SHARD,
                           progress=False)
    assert "up to date" in capsys.readouterr().out
    assert again == meta and _mtimes(out) == before
    # a file went missing: prepared again
    (out / "train" / "shard_00001.bin").unlink()
    prepare_corpus(inputs, tokenizer_file, out, workers=1, shard_tokens=SHARD, progress=False)
    assert "up to date" not in capsys.readouterr().out
    assert (out / "train" / "shard_00001.bin").is_file()

    # an option changes: prepared again, no stale shard left behind
    meta = prepare_corpus(inputs, tokenizer_file, out, workers=1, shard_tokens=4 * SHARD,
                          progress=False)
    assert "up to date" not in capsys.readouterr().out
    assert _mtimes(out)["meta.json"] != before["meta.json"]
    for name in SPLITS:
        assert len(list((out / name).glob("shard_*.bin"))) == meta["shards"][name]
    # an input changes (its mtime here): prepared again
    before = _mtimes(out)
    stat = inputs[0].stat()
    os.utime(inputs[0], ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    prepare_corpus(inputs, tokenizer_file, out, workers=1, shard_tokens=4 * SHARD,
                   progress=False)
    assert "up to date" not in capsys.readouterr().out
    assert _mtimes(out)["meta.json"] != before["meta.json"]
    # other split fractions
    meta = prepare_corpus(inputs, tokenizer_file, out, workers=1, shard_tokens=4 * SHARD,
                          val_fraction=0.2, progress=False)
    assert meta["documents"]["validation"] > 8
    # an unfinished directory (no meta.json) is prepared again
    (out / "meta.json").unlink()
    prepare_corpus(inputs, tokenizer_file, out, workers=1, shard_tokens=4 * SHARD,
                   val_fraction=0.2, progress=False)
    assert "up to date" not in capsys.readouterr().out
    assert load_prepared(out).meta["documents"] == meta["documents"]


def test_errors(tmp_path: Path, corpus_inputs: list[Path], tokenizer_file: Path) -> None:
    with pytest.raises(ValueError, match="duplicate document id '[a-z]"):
        prepare_corpus([corpus_inputs[0], corpus_inputs[0]], tokenizer_file, tmp_path / "d",
                       workers=1, progress=False)
    assert not (tmp_path / "d" / "meta.json").exists()
    assert not list((tmp_path / "d").glob(".*"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        prepare_corpus([tmp_path / "nope.jsonl"], tokenizer_file, tmp_path / "x")
    with pytest.raises(FileNotFoundError, match="tokenizer file not found"):
        prepare_corpus(corpus_inputs, tmp_path / "none.json", tmp_path / "x")
    with pytest.raises(ValueError, match="workers"):
        prepare_corpus(corpus_inputs, tokenizer_file, tmp_path / "x", workers=0)
    with pytest.raises(ValueError, match="shard_tokens"):
        prepare_corpus(corpus_inputs, tokenizer_file, tmp_path / "x", shard_tokens=0)
    with pytest.raises(ValueError, match="val_fraction"):
        prepare_corpus(corpus_inputs, tokenizer_file, tmp_path / "x", val_fraction=1.0)
    (tmp_path / "empty.jsonl").write_text(json.dumps({"text": " "}) + "\n")
    with pytest.raises(ValueError, match="no non-empty documents"):
        prepare_corpus(tmp_path / "empty.jsonl", tokenizer_file, tmp_path / "x", workers=1,
                       progress=False)


def test_cli_two_inputs(tmp_path: Path, one_worker: Path, corpus_inputs: list[Path],
                        tokenizer_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "data"
    args = ["data", "prepare", "--input", *map(str, corpus_inputs), "--tokenizer",
            str(tokenizer_file.parent), "--out", str(out), "--workers", "2",
            "--shard-tokens", str(SHARD)]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    meta = load_prepared(out).meta
    assert summary["tokens"] == meta["tokens"] and summary["shards"] == meta["shards"]
    assert _files(out) == _files(one_worker)
    assert main(args) == 0
    assert "up to date" in capsys.readouterr().out
    assert main(["data", "prepare", "--input", str(tmp_path / "none.jsonl"), "--tokenizer",
                 str(tokenizer_file), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
