"""What `hybridlm convert` refuses, by name: HF config fields hybridlm cannot represent, and
hybridlm layers with no HF counterpart. Nothing is dropped silently."""

from __future__ import annotations

import pytest

from convert_helpers import hf_config
from hybridlm.config import ModelConfig
from hybridlm.convert import convert_to_hf
from hybridlm.convert.common import ConvertError
from hybridlm.convert.registry import family_for_config, family_for_model_type
from hybridlm.model import HybridLM


def from_hf(model_type: str, **overrides):
    config = hf_config(model_type, **overrides)
    return family_for_model_type(config.model_type).config_from_hf(config)


@pytest.mark.parametrize(("model_type", "overrides", "named"), [
    ("llama", dict(rope_parameters={"rope_type": "linear", "factor": 2.0,
                                    "rope_theta": 10000.0}), "rope_type='linear'"),
    ("llama", dict(rope_parameters={"rope_type": "llama3", "factor": 8.0, "rope_theta": 1e4,
                                    "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                    "original_max_position_embeddings": 64}),
     "rope_type='llama3'"),
    ("llama", dict(attention_bias=True), "attention_bias=True"),
    ("llama", dict(mlp_bias=True), "mlp_bias=True"),
    ("llama", dict(head_dim=32), "head_dim=32"),
    ("llama", dict(hidden_act="gelu"), "hidden_act='gelu'"),
    ("llama", dict(attention_dropout=0.1), "attention_dropout=0.1"),
    ("qwen3", dict(head_dim=32), "head_dim=32"),
    ("qwen3", dict(use_sliding_window=True, sliding_window=8), "use_sliding_window=True"),
    ("qwen3", dict(layer_types=["sliding_attention", "full_attention"]), "sliding_attention"),
    ("qwen3", dict(attention_bias=True), "attention_bias=True"),
    ("mixtral", dict(sliding_window=16), "sliding_window=16"),
    ("mixtral", dict(router_jitter_noise=0.01), "router_jitter_noise=0.01"),
    ("mixtral", dict(head_dim=8), "head_dim=8"),
    ("mamba", dict(use_bias=True), "use_bias=True"),
    ("mamba", dict(use_conv_bias=False), "use_conv_bias=False"),
    ("mamba", dict(hidden_act="gelu"), "hidden_act='gelu'"),
    ("mamba", dict(intermediate_size=100), "intermediate_size=100"),
])
def test_unsupported_hf_fields_are_refused_by_name(model_type, overrides, named):
    with pytest.raises(ConvertError, match="not supported") as err:
        from_hf(model_type, **overrides)
    assert named in str(err.value) and "\n" not in str(err.value)


def test_an_unknown_model_type_is_refused_naming_the_known_ones():
    with pytest.raises(ConvertError, match=r"model_type='gpt2'.*'llama'"):
        family_for_model_type("gpt2")


def test_supported_hf_fields_map_onto_the_config():
    config = from_hf("llama", tie_word_embeddings=False, rms_norm_eps=1e-5,
                     rope_parameters={"rope_type": "default", "rope_theta": 5e5})
    assert (config.mixer_pattern, config.mlp_pattern) == ("A", "D")
    assert not config.mu_guidance and not config.attn_qk_norm and not config.pid_scaler
    assert (config.rope_theta, config.rms_norm_eps) == (5e5, 1e-5)
    assert not config.tie_word_embeddings and config.num_key_value_heads == 2


DENSE = dict(vocab_size=320, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, intermediate_size=96, mixer_pattern="A", mlp_pattern="D",
             mu_guidance=False, num_shared_experts=0, attn_qk_norm=False)


@pytest.mark.parametrize(("overrides", "named"), [
    (dict(mu_guidance=True), "mu guidance"),
    (dict(pid_scaler=True), "PiD scaler"),
    (dict(activation_clamp=5.0), "activation_clamp=5.0"),
    (dict(mlp_pattern="T", num_experts=2), "token routing"),
    (dict(mixer_pattern="AL"), "MLA"),
    (dict(mixer_pattern="AM"), "layout mixer_pattern='AM'"),
    (dict(mixer_pattern="M", mlp_pattern="D"), "layout mixer_pattern='M'"),
    (dict(mlp_pattern="DE", num_experts=4), "layout"),
    (dict(mlp_pattern="E", num_experts=4, num_shared_experts=1), "shared experts"),
    (dict(mlp_pattern="E", num_experts=4, moe_router="expert_choice"), "moe_router="),
    (dict(mlp_pattern="E", num_experts=4, moe_score="sigmoid"), "moe_score='sigmoid'"),
    (dict(mlp_pattern="E", num_experts=4, moe_renormalize=False), "moe_renormalize=False"),
    (dict(mlp_pattern="E", num_experts=4, moe_capacity_factor=1.25), "moe_capacity_factor"),
    (dict(mlp_pattern="E", num_experts=4, attn_qk_norm=True), "QK-norm"),
    (dict(mlp_pattern="E", num_experts=4, moe_shortcut=True), "ScMoE"),
    (dict(mlp_pattern="E", num_experts_per_layer=[4, 2], moe_top_k=2), "num_experts_per_layer"),
])
def test_layers_without_an_hf_counterpart_are_refused_with_the_reason(overrides, named):
    config = ModelConfig(**{**DENSE, **overrides})
    with pytest.raises(ConvertError, match="no HF counterpart") as err:
        family_for_config(config)
    assert named in str(err.value) and "\n" not in str(err.value)


def test_every_reason_is_given_at_once():
    config = ModelConfig(**{**DENSE, "mu_guidance": True, "pid_scaler": True})
    with pytest.raises(ConvertError) as err:
        family_for_config(config)
    assert "mu guidance" in str(err.value) and "PiD scaler" in str(err.value)


def test_mixtral_maps_onto_the_softmax_top_k_renormalised_router():
    """Mixtral: softmax over all experts, keep the top k, rescale them to sum 1; no bias, no
    capacity. hybridlm's topk router computes exactly that with these settings."""
    config = from_hf("mixtral", num_local_experts=4, num_experts_per_tok=2,
                     router_aux_loss_coef=0.02)
    assert (config.mlp_pattern, config.moe_router, config.moe_top_k) == ("E", "topk", 2)
    assert (config.moe_score, config.moe_renormalize) == ("softmax", True)
    assert config.moe_capacity_factor is None and config.num_shared_experts == 0
    assert (config.num_experts, config.moe_expert_size) == (4, 96)
    assert (config.moe_balance, config.moe_aux_loss_coef) == ("aux_loss", 0.02)
    assert family_for_config(config).name == "Mixtral"


def test_a_moved_selection_bias_is_refused(tmp_path):
    """aux-free balancing moves expert_bias, which picks experts; Mixtral has none."""
    config = from_hf("mixtral")
    model = HybridLM(config)
    model.layers[1].mlp.router.expert_bias[2] = 0.5
    model.save_pretrained(tmp_path / "ours")
    with pytest.raises(ConvertError, match=r"layers\.1\.mlp\.router\.expert_bias is not zero"):
        convert_to_hf(tmp_path / "ours", tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_mamba_maps_onto_mixer_only_blocks():
    config = from_hf("mamba", state_size=8, conv_kernel=3, expand=2, time_step_rank=5)
    assert (config.mixer_pattern, config.mlp_pattern) == ("M", "N")
    assert (config.mamba_d_state, config.mamba_d_conv, config.mamba_dt_rank) == (8, 3, 5)
    assert family_for_config(config).name == "Mamba"


def test_plain_dense_stacks_find_their_family():
    assert family_for_config(ModelConfig(**DENSE)).name == "Llama"
    assert family_for_config(ModelConfig(**{**DENSE, "attn_qk_norm": True})).name == "Qwen3"


def test_weights_that_do_not_match_the_config_are_refused_by_name(tmp_path):
    HybridLM(ModelConfig(**DENSE)).save_pretrained(tmp_path / "ours")
    config_file = tmp_path / "ours" / "config.json"
    config_file.write_text(ModelConfig(**{**DENSE, "intermediate_size": 128}).to_json())
    with pytest.raises(ConvertError, match=r"wrong shapes \['layers\.0\.mlp\.ffn\.down_proj"):
        convert_to_hf(tmp_path / "ours", tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
