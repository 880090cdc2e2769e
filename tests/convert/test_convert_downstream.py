"""A converted model is a model directory like any other: its tokenizer (with the family's own
eos token) prepares data, and `sft` fine-tunes it into a run whose model keeps that
tokenizer."""

from __future__ import annotations

import json

import numpy as np
import pytest

from convert_helpers import TEXTS, save_hf_model
from hybridlm.cli import main
from hybridlm.convert import convert_from_hf
from hybridlm.data import Tokenizer, load_prepared


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("downstream")
    save_hf_model(root / "hf", "llama")
    convert_from_hf(root / "hf", root / "ours")
    return root / "ours"


def test_data_prepared_with_a_converted_tokenizer_ends_documents_with_its_eos(converted,
                                                                              tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": str(i), "text": TEXTS[i % len(TEXTS)]}) + "\n"
                              for i in range(40)))
    out = tmp_path / "data"
    assert main(["data", "prepare", "--input", str(corpus), "--tokenizer", str(converted),
                 "--out", str(out), "--workers", "1"]) == 0
    data = load_prepared(out)
    eos = Tokenizer.from_file(converted).eos_token_id
    assert eos == 2 and json.loads((out / "meta.json").read_text())["eos_token_id"] == eos
    tokens = np.asarray(data.split("train")[:])
    assert tokens[-1] == eos and (tokens == eos).sum() > 1
    assert 0 not in tokens.tolist()  # <unk>: never written as a document's end
    assert Tokenizer.from_file(out).eos_token == "</s>"


def test_sft_from_a_converted_model_keeps_its_tokenizer(converted, tmp_path):
    chats = tmp_path / "chats.jsonl"
    chats.write_text("".join(json.dumps({"prompt": f"fox {i}?", "response": "the lazy dog."})
                             + "\n" for i in range(16)))
    out = tmp_path / "sft"
    assert main(["sft", "--model", str(converted), "--data", str(chats), "--out", str(out),
                 "--steps", "2", "--batch-size", "2", "--seq-len", "32",
                 "--set", "progress=false"]) == 0
    tokenizer = Tokenizer.from_file(out)
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == ("</s>", 2)
