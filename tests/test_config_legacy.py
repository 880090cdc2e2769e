"""Configs of the release before the field rename: its model directories load with the same
logits (tests/fixtures/legacy_model_dirs, made by tests/fixtures/make_legacy_model_dirs.py),
`config_legacy.upgrade` maps every old field, and anywhere else an old name is refused with
the new one named."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from cli_errors import assert_one_line_error
from hybridlm import ConfigError, HybridLM, ModelConfig
from hybridlm.config_legacy import RENAMED, upgrade
from hybridlm.train import TrainConfig, load_train_config

FIXTURES = Path(__file__).parent / "fixtures" / "legacy_model_dirs"


# --- the model directories saved by the old release --------------------------------------------
@pytest.mark.parametrize("name", ["token_routed", "mixed"])
def test_old_model_directories_load_with_their_logits(name):
    directory = FIXTURES / name
    assert "mlp_type" in json.loads((directory / "config.json").read_text())  # old names
    expected = json.loads((directory / "expected_logits.json").read_text())
    model = HybridLM.from_pretrained(directory).eval()
    with torch.no_grad():
        logits = model(torch.tensor(expected["input_ids"])).logits
    torch.testing.assert_close(logits, torch.tensor(expected["logits"]), atol=1e-5, rtol=0)


def test_the_upgraded_configs_name_the_same_models_in_new_fields():
    tr = HybridLM.from_pretrained(FIXTURES / "token_routed").config
    assert (tr.mlp_pattern, tr.tr_routing, tr.num_shared_experts) == ("T", "zipf", 1)
    assert (tr.shared_expert_intermediate_size, tr.pid_scaler, tr.mu_guidance) == (24, True, True)
    mixed = HybridLM.from_pretrained(FIXTURES / "mixed").config
    assert (mixed.mixer_pattern, mixed.mlp_pattern) == ("ALMA", "DETE")
    # the old T layer's shared expert (one routed T expert wide, 32 / 4) and the E layers'
    # one of round(0.5 x 16) are both 8 wide: one scheme with an explicit width
    assert (mixed.num_shared_experts, mixed.shared_expert_intermediate_size) == (1, 8)
    assert (mixed.moe_balance, mixed.moe_aux_free_rate, mixed.moe_capacity_factor) == (
        "aux_free", 0.01, 1.25)
    assert mixed.attn_qk_norm is False
    saved = mixed.to_dict()
    assert not set(saved) & set(RENAMED)  # saving again writes today's names


def test_a_loaded_old_directory_saves_in_new_names_and_reloads(tmp_path):
    model = HybridLM.from_pretrained(FIXTURES / "mixed")
    model.save_pretrained(tmp_path / "m")
    written = json.loads((tmp_path / "m" / "config.json").read_text())
    assert "tr_routing" in written and not set(written) & set(RENAMED)
    again = HybridLM.from_pretrained(tmp_path / "m")
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(),
                                                 model.state_dict().values(), strict=True))


# --- upgrade, field by field ------------------------------------------------------------------
OLD_MOE = dict(mlp_type="moe", num_experts=4, intermediate_size=32, moe_num_shared=0)


@pytest.mark.parametrize("old, new", [
    (dict(mlp_type="dense"), dict(mlp_pattern="D")),
    (dict(mlp_type="token_routed", mlp_pattern="DE"), dict(mlp_pattern="DT")),
    (dict(mlp_type="moe", mlp_pattern="DET", shared_expert=False),
     dict(mlp_pattern="DET", num_shared_experts=0)),
    (dict(routing="zipf"), dict(tr_routing="zipf", mlp_pattern="T")),
    (dict(shared_expert=False), dict(num_shared_experts=0)),
    (dict(intermediate_size=64, shared_expert_intermediate_size=40),
     dict(num_shared_experts=1, shared_expert_intermediate_size=40)),
    (dict(OLD_MOE, moe_num_shared=2, shared_expert_ratio=0.5),
     dict(num_shared_experts=2, shared_expert_intermediate_size=16)),
    (dict(OLD_MOE, moe_num_shared=3), dict(num_shared_experts=3,
                                           shared_expert_intermediate_size=None)),
    (dict(OLD_MOE, shared_expert=True, shared_expert_intermediate_size=99),  # unused on E
     dict(num_shared_experts=0)),
    (dict(OLD_MOE, moe_router="expert_choice", moe_capacity_factor=2.0),
     dict(moe_ec_capacity_factor=2.0, moe_capacity_factor=None)),
    (dict(OLD_MOE, moe_router="expert_choice"), dict(moe_ec_capacity_factor=1.0)),
    (dict(OLD_MOE, moe_capacity_factor=1.25), dict(moe_capacity_factor=1.25)),
    (dict(OLD_MOE, moe_balance="aux_free", moe_bias_update_rate=0.02),
     dict(moe_aux_free_rate=0.02, moe_ema_rate=0.001)),
    (dict(OLD_MOE, moe_balance="ema", moe_bias_update_rate=0.03, moe_load_ema_decay=0.5),
     dict(moe_ema_rate=0.03, moe_ema_decay=0.5, moe_aux_free_rate=0.001)),
    (dict(use_qk_norm=False, use_mu_guidance=False, use_dynamic_scaler=True,
          scaler_bias_init=2.0),
     dict(attn_qk_norm=False, mu_guidance=False, pid_scaler=True, pid_scaler_bias_init=2.0)),
])
def test_upgrade_maps_each_old_field(old, new):
    config = ModelConfig.from_dict(upgrade(old))
    for name, value in new.items():
        assert getattr(config, name) == value, name


def test_upgrade_leaves_new_configs_alone():
    data = ModelConfig(mlp_pattern="DE").to_dict()
    assert upgrade(data) is data


def test_a_shared_expert_layout_one_scheme_cannot_express_is_refused():
    # old default: T layers had a shared expert, E layers none (moe_num_shared=0)
    with pytest.raises(ConfigError, match="different counts or widths"):
        upgrade(dict(OLD_MOE, mlp_pattern="TE"))


def test_an_old_config_with_a_value_of_the_wrong_type_is_a_config_error(tmp_path):
    directory = tmp_path / "m"
    shutil.copytree(FIXTURES / "mixed", directory)
    data = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**data, "mlp_pattern": 7}))
    with pytest.raises(ConfigError, match="config.json"):
        HybridLM.from_pretrained(directory)


# --- old names anywhere else: refused, naming the new field -----------------------------------
@pytest.mark.parametrize("old, words", [
    ("routing", "routing was renamed to tr_routing"),
    ("mlp_type", "mlp_type was removed: mlp_pattern"),
    ("shared_expert", "num_shared_experts"),
    ("moe_num_shared", "renamed to num_shared_experts"),
    ("shared_expert_ratio", "shared_expert_intermediate_size"),
    ("moe_bias_update_rate", "moe_aux_free_rate (moe_balance='aux_free') and moe_ema_rate"),
    ("moe_load_ema_decay", "renamed to moe_ema_decay"),
    ("use_qk_norm", "renamed to attn_qk_norm"),
    ("use_mu_guidance", "renamed to mu_guidance"),
    ("use_dynamic_scaler", "renamed to pid_scaler"),
    ("scaler_bias_init", "renamed to pid_scaler_bias_init"),
])
def test_old_names_are_refused_everywhere_but_saved_directories(old, words, tmp_path):
    value = json.loads((FIXTURES / "token_routed" / "config.json").read_text())[old]
    attempts = [
        lambda: ModelConfig(**{old: value}),
        lambda: ModelConfig.from_dict({old: value}),
        lambda: ModelConfig.from_preset("tiny", **{old: value}),
        lambda: TrainConfig(data="d", out="o", model={old: value}),
        lambda: load_train_config(None, {"data": "d", "out": "o"},
                                  [f"model.{old}={json.dumps(value)}"]),
    ]
    run_file = tmp_path / "run.yaml"
    run_file.write_text(f"data: d\nout: o\nmodel:\n  {old}: {json.dumps(value)}\n")
    attempts.append(lambda: load_train_config(run_file))
    for attempt in attempts:
        with pytest.raises(ConfigError) as refused:
            attempt()
        assert words in str(refused.value)


def test_the_command_line_names_the_new_field(tmp_path, capsys):
    run = tmp_path / "run"
    assert_one_line_error(["train", "--data", tmp_path / "no-data", "--out", run, "--set",
                           "model.routing=zipf"], "routing was renamed to tr_routing",
                          capsys=capsys)
    assert not run.exists()
