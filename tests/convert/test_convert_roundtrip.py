"""Each family both ways on tiny random models: HF -> hybridlm -> HF gives the same logits,
the same greedy tokens (HF generate vs HybridLM.generate), the same tokenizer, and back on the
HF side exactly the tensors it started from."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from convert_helpers import (
    assert_same_greedy,
    assert_same_logits,
    assert_same_tokenizer,
    hf_state,
    save_hf_model,
    transformers,
)
from hybridlm.convert import convert_from_hf, convert_to_hf
from hybridlm.data import Tokenizer
from hybridlm.model import HybridLM

CASES = {
    "llama-untied": ("llama", dict(tie_word_embeddings=False)),
    "llama-tied": ("llama", dict(tie_word_embeddings=True)),
    "qwen3": ("qwen3", dict(tie_word_embeddings=False)),
    "mixtral": ("mixtral", dict(tie_word_embeddings=False)),
    "mamba": ("mamba", dict(tie_word_embeddings=True)),
    "mamba-untied": ("mamba", dict(tie_word_embeddings=False)),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def converted(request, tmp_path_factory):
    """(HF model, its tokenizer, our converted model, our dir, HF model converted back, its
    dir) of one case."""
    model_type, overrides = CASES[request.param]
    root = tmp_path_factory.mktemp(request.param)
    hf_model = save_hf_model(root / "hf", model_type, **overrides)
    convert_from_hf(root / "hf", root / "ours")
    convert_to_hf(root / "ours", root / "back")
    back = transformers.AutoModelForCausalLM.from_pretrained(root / "back").eval()
    return dict(hf=hf_model, hf_tok=transformers.AutoTokenizer.from_pretrained(root / "hf"),
                ours=HybridLM.from_pretrained(root / "ours").eval(), ours_dir=root / "ours",
                back=back, back_dir=root / "back")


def test_from_hf_keeps_the_logits(converted):
    assert_same_logits(converted["hf"], converted["ours"])


def test_from_hf_keeps_greedy_generation(converted):
    assert_same_greedy(converted["hf"], converted["ours"])


def test_from_hf_keeps_the_tokenizer(converted):
    assert_same_tokenizer(converted["hf_tok"], Tokenizer.from_file(converted["ours_dir"]))


def test_to_hf_keeps_the_logits(converted):
    assert_same_logits(converted["back"], converted["ours"])


def test_to_hf_keeps_greedy_generation(converted):
    assert_same_greedy(converted["back"], converted["ours"])


def test_to_hf_keeps_the_tokenizer(converted):
    back_tok = transformers.AutoTokenizer.from_pretrained(converted["back_dir"])
    assert_same_tokenizer(back_tok, Tokenizer.from_file(converted["ours_dir"]))
    text = "the quick brown fox"
    assert back_tok(text)["input_ids"] == converted["hf_tok"](text)["input_ids"]


def test_the_round_trip_gives_back_the_same_tensors_and_config(converted):
    original, back = hf_state(converted["hf"]), hf_state(converted["back"])
    assert sorted(back) == sorted(original)
    for name, tensor in original.items():
        assert torch.equal(back[name], tensor), name
    back, original = converted["back"].config, converted["hf"].config
    assert back.tie_word_embeddings == original.tie_word_embeddings
    assert back.model_type == original.model_type


def test_a_bfloat16_checkpoint_stays_bfloat16_both_ways(tmp_path):
    hf_model = save_hf_model(tmp_path / "hf", "llama").to(torch.bfloat16)
    hf_model.save_pretrained(tmp_path / "hf")
    convert_from_hf(tmp_path / "hf", tmp_path / "ours")
    with safe_open(str(tmp_path / "ours" / "model.safetensors"), framework="pt") as file:
        assert {file.get_tensor(name).dtype for name in file.keys()} == {torch.bfloat16}
    convert_to_hf(tmp_path / "ours", tmp_path / "back")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back", dtype="auto")
    assert back.config.dtype == torch.bfloat16
    original, returned = hf_state(hf_model), hf_state(back)
    assert all(torch.equal(returned[name], t) for name, t in original.items())
