"""Shared fixtures: tiny model configs, history-dependent models and the cache breakages they
must expose, the demo corpus, a small tokenizer, prepared data."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import hybridlm.model
from hybridlm import HybridLM, ModelConfig
from hybridlm.data import DEMO_CORPUS, Document, Tokenizer, load_documents, split_documents
from hybridlm.layers.attention import KVCache
from hybridlm.layers.block import Block
from hybridlm.layers.mamba import Mamba
from hybridlm.layers.mla import MLACache


def tiny_config(**overrides) -> ModelConfig:
    """A very small model for fast unit tests (sub-second forward/backward on CPU)."""
    base = dict(
        vocab_size=97, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=64, num_experts=4,
        max_position_embeddings=64,
    )
    return ModelConfig(**{**base, **overrides})


def _fit_fixed_batch(model: HybridLM, ids: torch.Tensor, steps: int,
                     lr: float = 3e-3) -> list[float]:
    """Train `model` on one fixed batch ids (B, T) with AdamW; the loss of every step."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.fixture
def fit_fixed_batch() -> Callable[..., list[float]]:
    return _fit_fixed_batch


@pytest.fixture
def make_model():
    def build(seed: int = 0, **overrides) -> HybridLM:
        torch.manual_seed(seed)
        return HybridLM(tiny_config(**overrides)).eval()

    return build


# At the default init (std 0.02, tied embeddings) a tiny model's logits barely depend on
# anything but the last token: greedy decoding repeats it, and a cache that loses the history
# changes nothing visible. Untied embeddings and a 15 times wider init make every mixer's
# history move the logits by several units (a cache bug then shows as an error of ~3-10
# against a float parity error of ~1e-5), and greedy continuations varied.
HISTORY_INIT_STD = 0.3


@pytest.fixture
def make_history_model():
    """Builder of models whose outputs depend on the whole history: give a ModelConfig, or
    overrides of `tiny_config`. The tests that use it check that greedy output is varied and
    that each cache breakage (`break_cache`) is visible, so the fixture cannot silently fade."""

    def build(config: ModelConfig | None = None, seed: int = 0, **overrides) -> HybridLM:
        config = config if config is not None else tiny_config(**overrides)
        config = dataclasses.replace(
            config, tie_word_embeddings=False, initializer_range=HISTORY_INIT_STD
        )
        torch.manual_seed(seed)
        return HybridLM(config).eval()

    return build


def _returns_only_new_entries(append: Callable) -> Callable:
    """A cache `append` that stores as usual but hands back only the entries just written, so
    the new tokens attend to themselves alone: a cache that forgets its history."""

    def forgetful(self, *new: torch.Tensor) -> tuple[torch.Tensor, ...]:
        append(self, *new)
        return new

    return forgetful


def _returns_only_new_latents(append: Callable) -> Callable:
    """The MLA cache's `append` made forgetful: it hands back only the [c_kv | k_rope] rows
    just written (B, T, r+dr), not the history before them."""

    def forgetful(self, c_kv: torch.Tensor, k_rope: torch.Tensor) -> torch.Tensor:
        append(self, c_kv, k_rope)
        return torch.cat([c_kv, k_rope], dim=-1)

    return forgetful


def _drops_mamba_state(field: str) -> Callable:
    """Mamba.forward that zeroes the cache's `field` (conv_state or ssm_state) before each call."""
    forward = Mamba.forward

    def forgetful(self, x: torch.Tensor, *, cache=None, **kwargs) -> torch.Tensor:
        if cache is not None:
            getattr(cache, field).zero_()
        return forward(self, x, cache=cache, **kwargs)

    return forgetful


def _restarts_positions() -> Callable:
    """Block.forward that numbers a cached call's tokens from 0, as if HybridLM.forward took
    `start = 0` instead of the cache length."""
    forward = Block.forward

    def restarted(self, h: torch.Tensor, *, positions: torch.Tensor, cache=None, **kwargs):
        if cache is not None:
            positions = positions - positions[..., :1]
        return forward(self, h, positions=positions, cache=cache, **kwargs)

    return restarted


def _positions_of_row_0() -> Callable:
    """cache_positions that numbers every row from row 0's length, as if the cache held one
    length for the whole batch."""
    from hybridlm import model

    positions = model.cache_positions

    def shared(start, seq, device):
        return positions(None if start is None else start[:1].expand_as(start), seq, device)

    return shared


def _padding_advances_mamba_ssm() -> Callable:
    """Mamba steps its SSM state through the padding of right-padded rows."""
    return staticmethod(lambda delta, input_lengths: delta)


def _padding_enters_mamba_conv() -> Callable:
    """Mamba keeps the last K-1 conv inputs of the padded row, padding included."""
    last = Mamba._last_conv_inputs

    def padded(self, x, input_lengths):
        return last(self, x, None)

    return padded


# name -> (class, attribute, replacement): the ways a cache can lose the history.
CACHE_BREAKAGES: dict[str, tuple[object, str, Callable[[], Callable]]] = {
    "kv_cache_forgets": (KVCache, "append", lambda: _returns_only_new_entries(KVCache.append)),
    "mla_cache_forgets": (MLACache, "append", lambda: _returns_only_new_latents(MLACache.append)),
    "mamba_ssm_state_dropped": (Mamba, "forward", lambda: _drops_mamba_state("ssm_state")),
    "mamba_conv_state_dropped": (Mamba, "forward", lambda: _drops_mamba_state("conv_state")),
    "positions_restart_at_0": (Block, "forward", _restarts_positions),
    # the ways a batch of prompts of different lengths can mix its rows up
    "positions_of_row_0": (hybridlm.model, "cache_positions", _positions_of_row_0),
    "padding_advances_mamba_ssm": (Mamba, "_freeze_on_padding", _padding_advances_mamba_ssm),
    "padding_enters_mamba_conv": (Mamba, "_last_conv_inputs", _padding_enters_mamba_conv),
}


@pytest.fixture
def break_cache(monkeypatch: pytest.MonkeyPatch) -> Callable[[str], None]:
    """break_cache(name) applies one of CACHE_BREAKAGES until the test ends."""

    def apply(name: str) -> None:
        owner, attribute, make = CACHE_BREAKAGES[name]
        monkeypatch.setattr(owner, attribute, make())

    return apply


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
