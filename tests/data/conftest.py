"""Shared fixtures for the data-pipeline tests: the demo corpus and a small tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest

from hybridlm.data import DEMO_CORPUS, Document, Tokenizer, load_documents, split_documents


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
