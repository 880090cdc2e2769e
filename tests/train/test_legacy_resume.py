"""A run started by the release before the config rename resumes: its train_config.json and
its checkpoint's config.json hold the old field names."""

from __future__ import annotations

import json

import pytest

from hybridlm.config_legacy import RENAMED
from hybridlm.train import TrainConfig, train

SMALL = {"hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 256,
         "max_position_embeddings": 128}


def run_config(prepared_dir, out, **kw) -> TrainConfig:
    base = dict(data=str(prepared_dir), out=str(out), preset="tiny",
                model={**SMALL, "tr_routing": "zipf"}, steps=4, global_batch_size=8,
                seq_len=64, warmup_steps=1, eval_every=4, checkpoint_every=4, progress=False)
    return TrainConfig(**{**base, **kw})


def as_old_release(new: dict) -> dict:
    """A config.json of today's token-routed model as the old release wrote it."""
    old = {k: v for k, v in new.items() if k not in (
        "tr_routing", "num_shared_experts", "attn_qk_norm", "mu_guidance", "pid_scaler",
        "pid_scaler_bias_init", "moe_aux_free_rate", "moe_ema_rate", "moe_ema_decay",
        "moe_ec_capacity_factor")}
    return {**old, "mlp_type": "token_routed", "mlp_pattern": None,
            "routing": new["tr_routing"], "shared_expert": new["num_shared_experts"] == 1,
            "moe_num_shared": 0, "shared_expert_ratio": 1.0, "moe_bias_update_rate": 0.001,
            "moe_load_ema_decay": new["moe_ema_decay"], "use_qk_norm": new["attn_qk_norm"],
            "use_mu_guidance": new["mu_guidance"], "use_dynamic_scaler": new["pid_scaler"],
            "scaler_bias_init": new["pid_scaler_bias_init"]}


def make_old_run(prepared_dir, run) -> None:
    train(run_config(prepared_dir, run))
    saved = json.loads((run / "train_config.json").read_text())
    model = saved["model"]
    model["routing"] = model.pop("tr_routing")
    (run / "train_config.json").write_text(json.dumps(saved))
    for directory in (run, *(run / "checkpoints").iterdir()):
        config = directory / "config.json"
        config.write_text(json.dumps(as_old_release(json.loads(config.read_text()))))


def test_a_run_of_the_old_release_resumes(prepared_dir, tmp_path):
    run = tmp_path / "run"
    make_old_run(prepared_dir, run)
    result = train(run_config(prepared_dir, run, steps=6), resume=True, reschedule=True)
    assert (result.stopped, result.steps) == ("finished", 6)
    saved = json.loads((run / "train_config.json").read_text())
    assert saved["model"]["tr_routing"] == "zipf" and not set(saved["model"]) & set(RENAMED)


def test_an_old_run_resumed_with_another_model_is_refused(prepared_dir, tmp_path):
    run = tmp_path / "run"
    make_old_run(prepared_dir, run)
    other = run_config(prepared_dir, run, steps=6, model={**SMALL, "tr_routing": "modulo"})
    with pytest.raises(ValueError, match=r"model differs .*tr_routing: 'zipf' -> 'modulo'"):
        train(other, resume=True, reschedule=True)
