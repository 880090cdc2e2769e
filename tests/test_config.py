import json

import pytest
import torch

from hybridlm import PRESETS, HybridLM, ModelConfig


def test_json_round_trip(tmp_path):
    cfg = ModelConfig.from_preset("tiny", routing="zipf", activation_clamp=100.0)
    path = tmp_path / "c.json"
    cfg.to_json(path)
    assert ModelConfig.from_json(path) == cfg
    assert ModelConfig.from_json(cfg.to_json()) == cfg
    assert json.loads(cfg.to_json())["routing"] == "zipf"


def test_preset_overrides_apply():
    cfg = ModelConfig.from_preset("complexity-deep-187m", num_hidden_layers=2)
    assert cfg.num_hidden_layers == 2 and cfg.hidden_size == 768


def test_187m_parameter_count():
    cfg = ModelConfig.from_preset("complexity-deep-187m")
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads) == (768, 18, 12)
    assert (cfg.num_key_value_heads, cfg.num_experts, cfg.vocab_size) == (4, 4, 32000)
    with torch.device("meta"):
        model = HybridLM(cfg)
    # embed 24.58M + 18 x (qkv/o 1.57M + mu->qkv 0.98M + 4 experts 4.72M + shared 1.18M
    # + mu_proj 0.59M) - the last layer's unused mu_proj; exactly:
    h, kv, e_w = 768, 256, 512
    per_layer = (h * (h + 2 * kv) * 2 + h * h) + 4 * 3 * h * e_w + 3 * h * e_w + 2 * h + 2 * 64
    mu = h * h + h
    expected = 32000 * h + 18 * per_layer + 17 * mu + h + h  # + mu_init + final norm
    assert model.num_parameters() == expected
    assert abs(expected - 187e6) / 187e6 < 0.005
    # one routed expert of four is active per token
    assert model.num_parameters(active=True) == expected - 18 * 3 * 3 * h * e_w


def test_1_5b_preset_matches_table_3():
    cfg = ModelConfig.from_preset("complexity-deep-1.5b")
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads) == (24, 2048, 16)
    assert (cfg.num_key_value_heads, cfg.intermediate_size, cfg.num_experts) == (4, 8192, 4)
    assert (cfg.vocab_size, cfg.max_position_embeddings) == (32000, 4096)
    with torch.device("meta"):
        bare = HybridLM(ModelConfig.from_preset(
            "complexity-deep-1.5b", use_mu_guidance=False, shared_expert=False))
    # The paper's 1.5B total is met by attention + routed experts alone.
    assert abs(bare.num_parameters() - 1.5e9) / 1.5e9 < 0.02


def test_every_preset_builds_on_meta():
    for name in PRESETS:
        with torch.device("meta"):
            assert HybridLM(ModelConfig.from_preset(name)).num_parameters() > 0


@pytest.mark.parametrize(
    "overrides, words",
    [
        (dict(hidden_size=100, num_attention_heads=12),
         ["num_attention_heads=12", "hidden_size=100"]),
        (dict(num_key_value_heads=5), ["num_key_value_heads=5", "num_attention_heads=12"]),
        (dict(num_experts=0), ["num_experts=0", ">= 1"]),
        (dict(mlp_type="sparse"), ["mlp_type", "'sparse'", "token_routed"]),
        (dict(routing="hash"), ["routing", "'hash'", "zipf"]),
        (dict(num_experts=3), ["num_experts=3", "intermediate_size=2048"]),
        (dict(vocab_size=0), ["vocab_size=0"]),
        (dict(activation_clamp=-1.0), ["activation_clamp=-1.0"]),
        (dict(mu_update="sum"), ["mu_update", "'sum'"]),
    ],
)
def test_invalid_config_names_field_and_value(overrides, words):
    with pytest.raises(ValueError) as err:
        ModelConfig(**overrides)
    for word in words:
        assert word in str(err.value)


def test_unknown_preset_lists_allowed():
    with pytest.raises(ValueError, match="unknown preset 'nope'.*tiny"):
        ModelConfig.from_preset("nope")


def test_unknown_field_is_refused():
    with pytest.raises(ValueError, match="hiden_size"):
        ModelConfig.from_dict({"hiden_size": 3})
