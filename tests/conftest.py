import pytest
import torch

from hybridlm import HybridLM, ModelConfig


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
