"""Byte-level BPE tokenizer: exact round trips, end-of-text id, persistence, validation."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models

from hybridlm.data import EOS_TOKEN, Document, Tokenizer

TRICKY = [
    "",
    " ",
    "   ",
    "\n",
    "\n\n\n",
    " leading space",
    "  two leading spaces",
    "trailing spaces   ",
    "multiple    inner     spaces",
    "tabs\tand\r\nwindows\rline ends",
    "emoji 🙂👍🏽 family 👨‍👩‍👧 flags 🇫🇷",
    "日本語のテキスト、中文，한국어",
    "Ünïcödé çombining: e\u0301 a\u0308",
    "zero\u200bwidth\u00a0nbsp\ufeffbom",
    "control \x00\x01\x7f chars",
    "<|endoftext|>",
    "text <|endoftext|> inside",
    "Call me Ishmael. Some years ago—never mind how long precisely—",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 astral \U0010ffff",
]


@pytest.mark.parametrize("text", TRICKY)
def test_round_trip_tricky(small_tokenizer: Tokenizer, text: str) -> None:
    ids = small_tokenizer.encode(text)
    assert small_tokenizer.decode(ids) == text
    assert all(0 <= i < small_tokenizer.vocab_size for i in ids)


def test_round_trip_random_unicode(small_tokenizer: Tokenizer) -> None:
    rng = random.Random(0)
    for _ in range(50):
        chars = []
        for _ in range(rng.randint(0, 60)):
            cp = rng.choice([rng.randint(0x20, 0x7E), rng.randint(0, 0xD7FF),
                             rng.randint(0xE000, 0x10FFFF), 0x20, 0x0A])
            chars.append(chr(cp))
        text = "".join(chars)
        assert small_tokenizer.decode(small_tokenizer.encode(text)) == text


def test_round_trip_real_documents(small_tokenizer: Tokenizer, demo_docs: list[Document]) -> None:
    texts = [d.text[:20000] for d in demo_docs[::40]]
    for text, ids in zip(texts, small_tokenizer.encode_batch(texts), strict=True):
        assert small_tokenizer.decode(ids) == text
    # merges were learned: real text compresses well below one token per byte
    n_tokens = sum(len(ids) for ids in small_tokenizer.encode_batch(texts))
    assert n_tokens < 0.6 * sum(len(t.encode()) for t in texts)


def test_eos_and_vocab(small_tokenizer: Tokenizer) -> None:
    assert small_tokenizer.eos_token_id == 0
    assert small_tokenizer.eos_token == EOS_TOKEN == "<|endoftext|>"
    assert small_tokenizer.token_to_id(EOS_TOKEN) == 0
    assert small_tokenizer.encode(EOS_TOKEN) == [0]
    assert small_tokenizer.vocab_size == len(small_tokenizer) == 500
    assert small_tokenizer.decode([0], skip_special_tokens=True) == ""
    assert 0 not in small_tokenizer.encode("plain text without the marker")


def test_encode_batch_matches_encode(small_tokenizer: Tokenizer) -> None:
    assert small_tokenizer.encode_batch(TRICKY) == [small_tokenizer.encode(t) for t in TRICKY]
    assert small_tokenizer.encode_batch([]) == []


def test_training_is_deterministic() -> None:
    texts = ["the cat sat on the mat", "the dog sat on the log"] * 20
    a = Tokenizer.train(texts, vocab_size=300)
    b = Tokenizer.train(iter(texts), vocab_size=300)
    assert a.backend.to_str() == b.backend.to_str()


def test_save_and_load(small_tokenizer: Tokenizer, tmp_path: Path) -> None:
    file = small_tokenizer.save(tmp_path / "nested" / "tok.json")
    assert file.is_file()
    loaded = Tokenizer.from_file(file)
    assert loaded.vocab_size == small_tokenizer.vocab_size
    assert loaded.encode_batch(TRICKY) == small_tokenizer.encode_batch(TRICKY)
    (tmp_path / "dir").mkdir()
    assert small_tokenizer.save(tmp_path / "dir") == tmp_path / "dir" / "tokenizer.json"
    from_dir = Tokenizer.from_file(tmp_path / "dir")
    assert from_dir.encode(TRICKY[10]) == small_tokenizer.encode(TRICKY[10])


def test_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="tokenizer file not found"):
        Tokenizer.from_file(tmp_path / "missing.json")
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.json"):
        Tokenizer.from_file(tmp_path)
    for bad in (257, 100, 0):
        with pytest.raises(ValueError, match="vocab_size"):
            Tokenizer.train(["some text"], vocab_size=bad)
    with pytest.raises(ValueError, match="min_frequency"):
        Tokenizer.train(["some text"], vocab_size=300, min_frequency=0)
    with pytest.raises(ValueError, match="<\\|endoftext\\|>"):
        Tokenizer(HFTokenizer(models.BPE()))


def test_a_converted_tokenizer_names_its_eos_token_in_tokenizer_config(tmp_path):
    """A tokenizer of another family (hybridlm convert --from-hf) keeps its ids; its eos token
    comes from tokenizer_config.json, and without that file <|endoftext|> must be id 0."""
    backend = HFTokenizer(models.BPE(vocab={"<unk>": 0, "<s>": 1, "</s>": 2, "a": 3},
                                     merges=[]))
    backend.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match="<\\|endoftext\\|>"):
        Tokenizer.from_file(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text('{"eos_token": {"content": "</s>"}}')
    tokenizer = Tokenizer.from_file(tmp_path)
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == ("</s>", 2)
    (tmp_path / "tokenizer_config.json").write_text('{"eos_token": "<eos>"}')
    with pytest.raises(ValueError, match="eos_token '<eos>' is not in the tokenizer's vocab"):
        Tokenizer.from_file(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text('{"eos_token": ')
    with pytest.raises(ValueError, match="tokenizer_config.json is not valid JSON"):
        Tokenizer.from_file(tmp_path)
