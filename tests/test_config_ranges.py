"""Each field's range, written out here as the spec: values just outside are refused with the
field and value named, values at the edge are accepted. Every numeric or choice field of
ModelConfig and TrainConfig must have a row, so a new field gets its range thought about."""

from __future__ import annotations

import typing
from dataclasses import fields

import pytest

from hybridlm import ConfigError, ModelConfig
from hybridlm.train import TrainConfig, load_train_config

# field: (refused, accepted), each on top of the defaults (the 187M model: 18 layers of
# token-routed MLPs with 4 experts, 12 heads of 64, 4 KV heads).
MODEL_RANGES = {
    "vocab_size": ([0, -1], [1]),
    "hidden_size": ([0, -768], [768 * 3]),
    "num_hidden_layers": ([0, -1], [1]),
    "num_attention_heads": ([0, -12], [4]),
    "num_key_value_heads": ([0, -4], [1]),
    "intermediate_size": ([0, -4], [4]),
    "max_position_embeddings": ([0], [1]),
    "rope_theta": ([0.0, -1.0], [1e-9]),
    "rms_norm_eps": ([0.0, -1e-6], [1e-12]),
    "initializer_range": ([0.0, -0.02], [1e-6]),
    "num_experts_per_layer": ([[-1] * 18, [4] * 17 + [0]], [[4] * 18, [1] * 18]),
    "num_experts": ([0, -1], [1]),
    "num_shared_experts": ([-1], [0, 2]),
    "shared_expert_intermediate_size": ([0], [1, None]),
    "moe_top_k": ([0], [1]),
    "moe_aux_loss_coef": ([-1e-9], [0.0]),
    "moe_aux_free_rate": ([-1e-9], [0.0]),
    "moe_ema_rate": ([-1e-9], [0.0]),
    "moe_ema_decay": ([-0.1, 1.0], [0.0, 0.999]),
    "moe_capacity_factor": ([0.0, -1.0], [1e-3, None]),
    "moe_ec_capacity_factor": ([0.0, -1.0, None], [1e-3]),
    "moe_intermediate_size": ([0], [1, None]),
    "mla_kv_rank": ([0], [1]),
    "mla_rope_dim": ([0, 3], [2]),
    "mla_q_rank": ([0], [1, None]),
    "mamba_d_state": ([0], [1]),
    "mamba_d_conv": ([0], [1]),
    "mamba_expand": ([0], [1]),
    "mamba_dt_rank": ([0], [1, None]),
    "mamba_chunk_size": ([0], [1]),
    "mu_clamp": ([0.0], [0.1]),
    "mu_ema_alpha": ([-0.1, 1.1], [0.0, 1.0]),
    "mu_ema_beta": ([-0.1, 1.1], [0.0, 1.0]),
    "pid_scaler_bias_init": ([], [-30.0, 30.0]),
    "activation_clamp": ([0.0, -1.0], [0.5, None]),
    "mixer_pattern": (["", "AX", "AMMMM"], ["AMM", "L"]),
    "mlp_pattern": (["", "DX", "DDDDE", None], ["D", "TE"]),
    "tr_routing": (["hash"], ["zipf"]),
    "moe_router": (["hash"], ["expert_choice"]),
    "moe_score": (["tanh"], ["sigmoid"]),
    "moe_balance": (["magic"], ["none", "ema"]),
    "mu_update": (["sum"], ["ema"]),
}
REQUIRED = {"data": "d", "out": "o"}
TRAIN_RANGES = {
    "data": ([""], ["x"]),
    "out": ([""], ["x"]),
    "task": (["rl"], ["sft"]),
    "init_from": ([""], ["m", None]),
    "preset": (["huge"], ["nexus-tiny"]),
    "steps": ([0, -1], [1]),
    "global_batch_size": ([0], [1]),
    "micro_batch_size": ([0], [1, None]),
    "seq_len": ([1, 0], [2]),
    "lr": ([0.0, -1e-3], [1e-9]),
    "min_lr_ratio": ([-0.1, 1.1], [0.0, 1.0]),
    "warmup_steps": ([-1], [0]),
    "schedule": (["linear"], ["wsd"]),
    "decay_fraction": ([0.0, 1.1], [1e-3, 1.0]),
    "restart_steps": ([[0], [-5]], [[5], []]),
    "weight_decay": ([-0.1], [0.0]),
    "beta1": ([-0.1, 1.0], [0.0, 0.999]),
    "beta2": ([-0.1, 1.0], [0.0, 0.999]),
    "grad_clip": ([], [-1.0, 0.0, 5.0]),  # <= 0 disables clipping
    "max_bad_steps": ([0], [1]),
    "eval_every": ([0], [1]),
    "eval_batches": ([0], [1]),
    "log_every": ([0], [1]),
    "checkpoint_every": ([0], [1]),
    "keep_checkpoints": ([0], [1]),
    "max_minutes": ([0.0, -1.0], [0.01, None]),
    "seed": ([-1, 2**63], [0, 2**63 - 1]),
    "device": ([""], ["cpu"]),
    "parallel": (["tp"], ["ddp"]),
}


def _rows(ranges, refused: bool):
    return [(name, value) for name, (bad, good) in ranges.items()
            for value in (bad if refused else good)]


@pytest.mark.parametrize("name, value", _rows(MODEL_RANGES, refused=True))
def test_model_value_out_of_range_is_refused(name, value):
    with pytest.raises(ConfigError, match=rf"(?<!\w){name}\b") as err:
        ModelConfig(**{name: value})
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("name, value", _rows(MODEL_RANGES, refused=False))
def test_model_value_at_the_edge_is_accepted(name, value):
    assert getattr(ModelConfig(**{name: value}), name) == value


@pytest.mark.parametrize("name, value", _rows(TRAIN_RANGES, refused=True))
def test_train_value_out_of_range_is_refused(name, value):
    with pytest.raises(ConfigError, match=rf"(?<!\w){name}\b"):
        TrainConfig(**{**REQUIRED, name: value})


@pytest.mark.parametrize("name, value", _rows(TRAIN_RANGES, refused=False))
def test_train_value_at_the_edge_is_accepted(name, value):
    assert getattr(TrainConfig(**{**REQUIRED, name: value}), name) == value


def _ranged(cls) -> set[str]:
    """Fields whose values have a range or a set of choices: all but the booleans and dicts."""
    hints = typing.get_type_hints(cls)
    return {f.name for f in fields(cls)
            if typing.get_origin(hints[f.name]) is not dict
            and bool not in (hints[f.name], *typing.get_args(hints[f.name]))}


@pytest.mark.parametrize("cls, table", [(ModelConfig, MODEL_RANGES), (TrainConfig, TRAIN_RANGES)])
def test_every_field_has_its_range_written_here(cls, table):
    assert _ranged(cls) == set(table)


# --- what reading a run adds: exponent floats, model overrides ---------------------------------
def test_exponent_floats_are_numbers_in_set_and_run_files(tmp_path):
    assert load_train_config(None, REQUIRED, ["lr=1e-3"]).lr == 1e-3
    path = tmp_path / "run.yaml"
    path.write_text("data: d\nout: o\nlr: 3E-4\nmodel:\n  moe_aux_loss_coef: 1e-2\n")
    cfg = load_train_config(path)
    assert (cfg.lr, cfg.model["moe_aux_loss_coef"]) == (3e-4, 1e-2)


def test_a_saved_run_with_a_small_learning_rate_reads_back(tmp_path):
    # json writes 1e-05 without a dot, which plain YAML would read as a string
    cfg = TrainConfig(**REQUIRED, lr=1e-5, min_lr_ratio=1e-7)
    cfg.save(tmp_path / "train_config.json")
    assert "1e-05" in (tmp_path / "train_config.json").read_text()
    assert load_train_config(tmp_path / "train_config.json") == cfg


def test_ints_for_floats_are_stored_as_floats():
    cfg = TrainConfig(**REQUIRED, lr=1, model={"rope_theta": 500000})
    assert type(cfg.lr) is float and type(cfg.model["rope_theta"]) is float
    assert type(ModelConfig(rope_theta=10).rope_theta) is float


@pytest.mark.parametrize("model, words", [
    ({"num_experts": 3}, ["preset 'tiny'", "num_experts=3", "intermediate_size=1024"]),
    ({"hiden_size": 64}, ["unknown model field 'hiden_size'", "did you mean 'hidden_size'"]),
    ({"num_experts": "4"}, ["model.num_experts='4'", "integer"]),
])
def test_model_overrides_are_checked_when_the_run_is_read(model, words):
    with pytest.raises(ConfigError) as err:
        TrainConfig(**REQUIRED, model=model)
    for word in words:
        assert word in str(err.value)


def test_model_overrides_with_init_from_are_refused():
    # the model directory's config.json decides; overrides would be silently ignored
    with pytest.raises(ConfigError, match=r"model overrides \['tr_routing'\] have no effect"):
        TrainConfig(**REQUIRED, init_from="m", model={"tr_routing": "zipf"})


def test_a_deep_model_validates_without_walking_its_layers():
    # validation reads the patterns, not one entry per layer: a typo'd depth is no hang
    cfg = ModelConfig(num_hidden_layers=10**18, mlp_pattern="E", mixer_pattern="AM")
    assert cfg.num_hidden_layers == 10**18


def test_set_gives_string_fields_the_text_as_typed():
    cfg = load_train_config(None, REQUIRED, ["out=2024", "device=cpu", "init_from=null",
                                             "model.mla_q_rank=~", "steps=7"])
    assert (cfg.out, cfg.device, cfg.init_from, cfg.steps) == ("2024", "cpu", None, 7)
    assert cfg.model == {"mla_q_rank": None}
