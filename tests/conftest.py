"""Shared fixtures: tiny model configs, the demo corpus, a small tokenizer, prepared data."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hybridlm import HybridLM, ModelConfig
from hybridlm.data import DEMO_CORPUS, Document, Tokenizer, load_documents, split_documents


def tiny_config(**overrides) -> ModelConfig:
    """A very small model for fast unit tests (sub-second forward/backward on CPU)."""
    base = dict(
        vocab_size=97, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=64, num_experts=4,
        max_position_embeddings=64,
    )
    return ModelConfig(**{**base, **overrides})


@pytest.fixture
def make_model():
    def build(seed: int = 0, **overrides) -> HybridLM:
        torch.manual_seed(seed)
        return HybridLM(tiny_config(**overrides)).eval()

    return build


@pytest.fixture(scope="session")
def demo_docs() -> list[Document]:
    return load_documents(DEMO_CORPUS)


@pytest.fixture(scope="session")
def small_tokenizer(demo_docs: list[Document]) -> Tokenizer:
    """Vocab-500 tokenizer trained on a ~400 kB slice of the demo corpus (~0.2 s)."""
    return Tokenizer.train([d.text[:4000] for d in demo_docs[::4]], vocab_size=500)


@pytest.fixture(scope="session")
def small_splits(demo_docs: list[Document]) -> dict[str, list[Document]]:
    """Demo splits with every document cut to 3000 characters (keeps encoding fast)."""
    splits = split_documents(demo_docs)
    return {
        name: [Document(d.id, d.text[:3000], d.source, d.title) for d in docs]
        for name, docs in splits.items()
    }


@pytest.fixture(scope="session")
def prepared_dir(
    tmp_path_factory: pytest.TempPathFactory,
    small_splits: dict[str, list[Document]],
    small_tokenizer: Tokenizer,
) -> Path:
    from hybridlm.data import prepare_dataset

    out = tmp_path_factory.mktemp("prepared")
    prepare_dataset(small_splits, small_tokenizer, out, source="demo corpus (truncated)")
    return out
