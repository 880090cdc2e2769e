"""Tiny random HF models and tokenizers, built offline, for the `hybridlm convert` tests.

    hf_dir = save_hf_model(tmp_path / "hf", "llama", tie_word_embeddings=False)
    assert_same_logits(hf_model, our_model)

Weights use a large init std so that a random model's greedy output depends on its history
(a small-std model repeats its last token, which would let a broken conversion pass).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

transformers = pytest.importorskip(
    "transformers", reason="the hf extra (transformers) is not installed: "
    "pip install 'hybridlm[hf]' to run the convert tests")

from tokenizers import Tokenizer as RawTokenizer  # noqa: E402
from tokenizers import decoders, models, pre_tokenizers, processors, trainers  # noqa: E402

from hybridlm.data import Tokenizer  # noqa: E402
from hybridlm.model import HybridLM  # noqa: E402

VOCAB = 320
INIT_STD = 0.5  # large: greedy decoding then varies with the history
TEXTS = ["the quick brown fox jumps over the lazy dog", "a stitch in time saves nine",
         "hybrid models mix attention and state space layers", "tokens, tokens everywhere!"]
SAMPLES = ["the lazy fox", "  spaces\tand\nnewlines ", "émoji 🙂 ok", "nine stitches"]

# Sizes of the tiny models: hidden 64, 2 layers, 4 query heads over 2 key/value heads.
SIZES = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, intermediate_size=96, max_position_embeddings=128,
             initializer_range=INIT_STD)


def hf_config(model_type: str, **overrides: Any) -> Any:
    """A tiny HF config of `model_type` (llama, qwen3, mixtral, mamba)."""
    if model_type == "mamba":
        fields = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, state_size=8,
                      expand=2, conv_kernel=4, time_step_rank=8, initializer_range=INIT_STD,
                      tie_word_embeddings=True)
        return transformers.MambaConfig(**{**fields, **overrides})
    extra: dict[str, Any] = dict(rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    if model_type == "qwen3":
        extra["head_dim"] = 16
    if model_type == "mixtral":
        extra.update(num_local_experts=4, num_experts_per_tok=2)
    config_class = transformers.AutoConfig.for_model(model_type).__class__
    return config_class(**{**SIZES, **extra, **overrides})


def build_tokenizer(eos: str) -> Any:
    """A tiny byte-level BPE as a PreTrainedTokenizerFast: with eos "</s>" Llama-like (<unk>,
    <s>, </s> at 0..2, <s> prepended), with "<|endoftext|>" GPT-NeoX-like (eos at 0)."""
    specials = ["<unk>", "<s>", "</s>"] if eos == "</s>" else ["<|endoftext|>"]
    raw = RawTokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.train_from_iterator(TEXTS * 4, trainers.BpeTrainer(
        vocab_size=300, special_tokens=specials, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if eos == "</s>":
        raw.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
        names = dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    else:
        names = dict(bos_token=eos, eos_token=eos, unk_token=eos)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=raw, **names)


def save_hf_model(directory: Path, model_type: str, seed: int = 0, **overrides: Any) -> Any:
    """A random tiny HF model of `model_type` with a tokenizer, saved to `directory`; returns
    the model (eval, fp32)."""
    torch.manual_seed(seed)
    config = hf_config(model_type, **overrides)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # norms start at one: vary them, so a misplaced norm shows
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
    if model_type == "mamba":  # keep dt and A in the trained range: the init's std is large
        with torch.no_grad():
            for layer in model.backbone.layers:
                layer.mixer.dt_proj.weight.mul_(0.1)
    model.save_pretrained(directory)
    build_tokenizer("<|endoftext|>" if model_type == "mamba" else "</s>").save_pretrained(
        directory)
    return model


def prompt_ids(batch: int = 2, length: int = 7, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def assert_same_logits(hf_model: Any, ours: HybridLM) -> None:
    ids = prompt_ids(batch=3, length=16)
    with torch.no_grad():
        theirs = hf_model(ids).logits.float()
        mine = ours.eval()(ids).logits.float()
    assert theirs.abs().max() > 1.0  # not a degenerate all-zero model
    torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-4)


def assert_same_greedy(hf_model: Any, ours: HybridLM, new: int = 12) -> None:
    """HF generate and HybridLM.generate pick the same greedy tokens, and they vary."""
    ids = prompt_ids()
    hf_model.generation_config.eos_token_id = None  # run all `new` steps on both sides
    hf_model.generation_config.pad_token_id = 0
    with torch.no_grad():
        theirs = hf_model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                   max_new_tokens=new, min_new_tokens=new)
        mine = ours.eval().generate(ids, max_new_tokens=new, do_sample=False)
    assert mine.tolist() == theirs.tolist()
    for row in mine[:, ids.shape[1]:].tolist():
        assert len(set(row)) >= 4, f"greedy output barely varies: {row}"


def assert_same_tokenizer(hf_tokenizer: Any, ours: Tokenizer) -> None:
    """Same ids for every sample (special tokens included) and the same text back."""
    assert ours.eos_token == hf_tokenizer.eos_token
    assert ours.eos_token_id == hf_tokenizer.eos_token_id
    for text in SAMPLES:
        ids = hf_tokenizer(text)["input_ids"]
        assert ours.encode(text) == ids
        assert ours.decode(ids, skip_special_tokens=True) == hf_tokenizer.decode(
            ids, skip_special_tokens=True)


def hf_state(model: Any) -> dict[str, torch.Tensor]:
    return {name: t.detach().clone() for name, t in model.state_dict().items()}
