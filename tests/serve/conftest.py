"""A saved model directory whose greedy output depends on the whole history, and live
servers over it (live_server.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("openai")
pytest.importorskip("uvicorn")

from live_server import API_KEY, MODEL_NAME, Live, serve_in_thread

from hybridlm import HybridLM, ModelConfig


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory, small_tokenizer) -> Path:
    """config + weights + tokenizer.json; 512 positions, so a request run to the end of the
    context lasts long enough to be cut off mid-way."""
    # As tests/conftest.py's make_history_model: untied, wide init (0.3), so the history
    # moves the logits; tests check greedy answers are varied, so this cannot fade.
    config = ModelConfig(
        vocab_size=small_tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
        mixer_pattern="AM", num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, num_experts=4, max_position_embeddings=512,
        tie_word_embeddings=False, initializer_range=0.3)
    torch.manual_seed(3)
    out = tmp_path_factory.mktemp("served") / MODEL_NAME
    HybridLM(config).save_pretrained(out)
    small_tokenizer.save(out)
    return out


@pytest.fixture(scope="module")
def live(model_dir) -> Iterator[Live]:
    yield from serve_in_thread(model_dir)


@pytest.fixture(scope="module")
def live_with_key(model_dir) -> Iterator[Live]:
    yield from serve_in_thread(model_dir, api_key=API_KEY)


@pytest.fixture(scope="module")
def live_one_row(model_dir) -> Iterator[Live]:
    """One cache row, and a request waits at most 0.3 s for it."""
    yield from serve_in_thread(model_dir, max_batch=1, queue_timeout=0.3)
