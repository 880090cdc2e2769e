"""The mixer registry and contract: a mixer defined in this file alone, registered under one
letter, trains in a stack and decodes with its cache exactly as the full forward; the registry
refuses a letter twice; config validation refuses a letter nobody registered.

Glossary: B batch, T tokens, H hidden, K conv width.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hybridlm import ConfigError, HybridLM
from hybridlm.config import ModelConfig
from hybridlm.layers.attention import Attention
from hybridlm.layers.mixers import Mixer, build_mixer
from hybridlm.registry import mixer_letters, register_mixer, unregister_mixer

TOY = "X"


def tiny_config(**overrides) -> ModelConfig:
    base = dict(vocab_size=97, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64)
    return ModelConfig(**{**base, **overrides})


@dataclass
class ConvCache:
    past: torch.Tensor  # (B, H, K - 1): the last inputs

    def nbytes(self) -> int:
        return self.past.numel() * self.past.element_size()


class CausalConvMixer(nn.Module):
    """A toy mixer: a causal depthwise conv over time (width K) followed by a projection."""

    reads_mu = False
    width = 3

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        hidden = config.hidden_size
        self.conv = nn.Conv1d(hidden, hidden, self.width, groups=hidden)
        self.out_proj = nn.Linear(hidden, hidden, bias=False)

    def new_cache(self, batch, max_len, device, dtype) -> ConvCache:
        hidden = self.conv.in_channels
        return ConvCache(torch.zeros(batch, hidden, self.width - 1, device=device, dtype=dtype))

    def forward(self, x, *, positions, cache=None, mu_prev=None, segment_ids=None):
        if segment_ids is not None:
            raise ValueError("the toy conv mixer does not take packed rows")
        xt = x.transpose(1, 2)  # (B, H, T)
        if cache is None:
            xt = F.pad(xt, (self.width - 1, 0))
        else:
            xt = torch.cat([cache.past.to(xt.dtype), xt], dim=-1)
            cache.past = xt[:, :, xt.shape[-1] - (self.width - 1):].detach()
        return self.out_proj(self.conv(xt).transpose(1, 2))  # (B, T, H)


@pytest.fixture
def toy_mixer():
    register_mixer(TOY, CausalConvMixer, "toy causal conv")
    yield CausalConvMixer
    unregister_mixer(TOY)  # other tests use X as the example of an unknown letter


def test_registered_toy_mixer_trains_in_a_stack(toy_mixer, fit_fixed_batch):
    torch.manual_seed(0)
    model = HybridLM(tiny_config(num_hidden_layers=2, mixer_pattern="AX", mlp_pattern="D"))
    assert isinstance(model.layers[1].mixer, toy_mixer)
    ids = torch.randint(0, 97, (4, 16))
    losses = fit_fixed_batch(model, ids, steps=25)
    assert losses[-1] < 0.7 * losses[0]
    assert model.layers[1].mixer.conv.weight.grad.abs().sum() > 0  # the toy itself learns


@pytest.mark.parametrize("pattern", ["AX", "XA", "ALM"])
def test_cached_decode_equals_full_forward(pattern, toy_mixer):
    torch.manual_seed(0)
    config = tiny_config(num_hidden_layers=3 if pattern == "ALM" else 2, mixer_pattern=pattern,
                         mlp_pattern="D")
    model = HybridLM(config).eval()
    ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        full = model(ids).logits  # (B, T, V)
        cache = model.new_cache(2, 9)
        pieces = [model(ids[:, :4], cache=cache).logits]
        pieces += [model(ids[:, t:t + 1], cache=cache).logits for t in range(4, 9)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)


def test_registry_refuses_a_letter_twice(toy_mixer):
    with pytest.raises(ValueError, match="'X' is already registered to CausalConvMixer"):
        register_mixer(TOY, Attention, "again")
    with pytest.raises(ValueError, match="'A' is already registered to Attention"):
        register_mixer("A", toy_mixer, "a second A")
    assert mixer_letters()[TOY] == "toy causal conv"  # the first registration stands


def test_registry_refuses_what_is_not_a_mixer():
    with pytest.raises(ValueError, match=r"lacks \['reads_mu', 'new_cache'\]"):
        register_mixer("Q", nn.Linear, "not a mixer")
    assert "Q" not in mixer_letters()


def test_config_refuses_an_unregistered_letter_listing_the_known_ones():
    with pytest.raises(ConfigError) as refused:
        tiny_config(mixer_pattern="AX")
    message = str(refused.value)
    assert "\n" not in message
    assert "unknown letters ['X']" in message
    assert all(f"'{letter}'" in message for letter in "ALM")


def test_config_reads_its_letters_from_the_registry(toy_mixer):
    assert tiny_config(num_hidden_layers=2, mixer_pattern="AX").layer_mixers == ["A", "X"]
    with pytest.raises(ConfigError, match="'X': 'toy causal conv'"):
        tiny_config(mixer_pattern="AZ")


@pytest.mark.parametrize("letter", ["A", "L", "M"])
def test_builtin_mixers_follow_the_contract(letter):
    config = tiny_config(mixer_pattern=letter)
    mixer = build_mixer(config, 0)
    assert isinstance(mixer, Mixer)
    x = torch.randn(1, 5, config.hidden_size)
    positions = torch.arange(5)
    with pytest.raises(ValueError, match="segment_ids"):  # packed rows never with a cache
        mixer(x, positions=positions, cache=mixer.new_cache(1, 5, x.device, x.dtype),
              segment_ids=torch.zeros(1, 5, dtype=torch.long))


def test_parameter_names_stay_those_of_saved_models():
    """Model directories written before the registry load: the state dict keys are unchanged."""
    model = HybridLM(tiny_config(mixer_pattern="ALM", mla_q_rank=8))
    names = {name for name in model.state_dict() if ".mixer." in name}
    gqa = {"qkv_proj.weight", "o_proj.weight", "q_norm.weight", "k_norm.weight"}
    mla = {"q_down.weight", "q_norm.weight", "q_up.weight", "kv_down.weight", "kv_norm.weight",
           "k_up.weight", "v_up.weight", "o_proj.weight"}
    mamba = {"in_proj.weight", "conv1d.weight", "conv1d.bias", "x_proj.weight",
             "dt_proj.weight", "dt_proj.bias", "out_proj.weight", "A_log", "D"}
    assert names == {f"layers.{i}.mixer.{p}" for i, ps in enumerate((gqa, mla, mamba)) for p in ps}


# --- what the trainer and the FSDP wrapper read from a mixer: its FLOPs and fp32 parts ---------
class ToyAttention(CausalConvMixer):
    """The toy conv declaring what an attention-like mixer would: non-parameter FLOPs of
    scores over seq_len keys, and a part (its conv) kept in fp32 under FSDP."""

    fp32_parameters = ("conv",)

    def non_parameter_flops(self, seq_len: int) -> float:
        return 7.0 * seq_len


@pytest.fixture
def toy_attention():
    register_mixer("Y", ToyAttention, "toy attention-like mixer")
    yield ToyAttention
    unregister_mixer("Y")


def test_training_flops_add_what_each_mixer_reports(toy_attention):
    from hybridlm.train.trainer import _flops_per_token

    config = tiny_config(mixer_pattern="ALMY", num_hidden_layers=4, mlp_pattern="D",
                         mla_kv_rank=16, mla_rope_dim=4, mamba_d_state=4)
    with torch.device("meta"):
        model = HybridLM(config)
    h, heads, seq = config.hidden_size, config.num_attention_heads, 128
    attention = 12 * h * seq  # scores and weighted sum, forward and backward
    mla = 6 * heads * (2 * config.head_dim + config.mla_rope_dim) * seq
    toy, mamba = 7.0 * seq, 0  # Mamba reports nothing: its scan is linear and small
    assert _flops_per_token(model, seq) == (
        6 * model.num_parameters(active=True) + attention + mla + toy + mamba)


def test_fsdp_keeps_what_a_mixer_lists_in_fp32(toy_attention, monkeypatch):
    """shard_fsdp, with fully_shard recorded instead of run: a mixer's listed parts go in its
    fp32 group, each other child with parameters first gets a low-precision group."""
    import torch.distributed.fsdp as fsdp

    from hybridlm.parallel.data_parallel import shard_fsdp

    groups = []
    monkeypatch.setattr(fsdp, "fully_shard",
                        lambda module, mp_policy: groups.append((module, mp_policy.param_dtype)))
    model = HybridLM(tiny_config(mixer_pattern="YM", num_hidden_layers=2, mlp_pattern="E",
                                 mamba_d_state=4))
    shard_fsdp(model, torch.bfloat16)
    dtype = {id(module): dt for module, dt in groups}
    toy, mamba = model.layers[0].mixer, model.layers[1].mixer
    assert dtype[id(toy)] == torch.float32 and dtype[id(toy.out_proj)] == torch.bfloat16
    assert id(toy.conv) not in dtype  # rides in the mixer's fp32 group
    assert dtype[id(mamba)] == torch.float32
    assert [dtype.get(id(getattr(mamba, n))) for n in ("in_proj", "x_proj", "out_proj")] == [
        torch.bfloat16] * 3
    assert all(id(getattr(mamba, n)) not in dtype for n in ("conv1d", "dt_proj"))
    assert dtype[id(model.layers[0].mlp.router)] == torch.float32  # the learned gate
    assert dtype[id(model.layers[0])] == torch.bfloat16 and dtype[id(model)] == torch.bfloat16
