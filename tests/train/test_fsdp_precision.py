"""The fp32 parts (MoE router gate; Mamba's A_log, D, dt_proj) stay fp32 under FSDP2's bf16
mixed precision and under autocast, while the rest of the model is gathered in bf16."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from hybridlm import HybridLM, ModelConfig
from hybridlm.layers import mamba as mamba_module

WORKER = Path(__file__).with_name("fsdp_precision_worker.py")
BASE = dict(vocab_size=61, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, intermediate_size=64, num_experts=4,
            max_position_embeddings=64, mamba_d_state=4, mlp_pattern="E")
CONFIGS = [dict(BASE, mixer_pattern="AM", moe_router="topk"),
           dict(BASE, mixer_pattern="MA", moe_router="expert_choice",
                moe_ec_capacity_factor=1.0)]
# Parameters gathered in fp32; conv1d rides in Mamba's fp32 group (its forward reads the
# weight directly) but is cast to the activations' dtype for the conv itself.
FP32_SUFFIXES = ("router.gate.weight", "mixer.A_log", "mixer.D", "mixer.dt_proj.weight",
                 "mixer.dt_proj.bias", "mixer.conv1d.weight", "mixer.conv1d.bias")


def _is_fp32_part(name: str) -> bool:
    return name.endswith(FP32_SUFFIXES)


def run_worker(out: Path, runs: list[dict]) -> list[list[dict]]:
    """Per rank, per run: what the worker recorded (see fsdp_precision_worker.py)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
           str(WORKER), str(out), json.dumps(runs)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.fixture(scope="module")
def fsdp_records(tmp_path_factory):
    """One torchrun for all: each config as sharded, then the first under the breakage."""
    runs = [{"model": c, "fp32_groups": True} for c in CONFIGS]
    runs.append({"model": CONFIGS[0], "fp32_groups": False})
    return run_worker(tmp_path_factory.mktemp("fsdp_precision"), runs)


def _expected_names(config: dict) -> list[str]:
    model = HybridLM(ModelConfig(**config))
    return [n for n, _ in model.named_parameters(remove_duplicate=False)]


@pytest.mark.parametrize("index", range(len(CONFIGS)),
                         ids=[c["moe_router"] for c in CONFIGS])
def test_fsdp_bf16_policy_gathers_the_fp32_parts_in_fp32_and_the_rest_in_bf16(
        fsdp_records, index):
    names = _expected_names(CONFIGS[index])
    assert sum(_is_fp32_part(n) for n in names) == 2 + 6  # one router and one Mamba
    for rank_records in fsdp_records:
        params = rank_records[index]["params"]
        assert sorted(params) == sorted(names)  # every parameter was seen gathered
        for name in names:
            seen = params[name]
            if _is_fp32_part(name):
                # fp32, and the master value itself: no bf16 round trip on the way
                assert seen["dtypes"] == ["torch.float32"], name
                assert seen["exact"], name
            else:  # the bf16 policy still applies to everything else
                assert seen["dtypes"] == ["torch.bfloat16"], name
                assert seen["bf16_rounded"], name


def test_fsdp_keeps_the_no_weight_decay_marks_and_trains(fsdp_records):
    for rank_records in fsdp_records:
        for records in rank_records[: len(CONFIGS)]:
            # A_log is 2-D: without its mark it would be weight-decayed under FSDP.
            assert [n.rsplit(".", 1)[1] for n in records["no_weight_decay"]] == ["A_log", "D"]
            first, second = records["losses"]
            assert second < first  # a step on the same batch lowers the loss


def test_a_bf16_policy_on_every_parameter_is_noticed(fsdp_records):
    """The breakage the gather test must catch (the old sharding): the fp32 parts arrive as
    bf16, A_log and the gate rounded."""
    params = fsdp_records[0][len(CONFIGS)]["params"]
    for name in ("layers.0.mlp.router.gate.weight", "layers.1.mixer.A_log"):
        assert params[name]["dtypes"] == ["torch.bfloat16"], name
        assert not params[name]["exact"], name


def test_mamba_step_sizes_run_in_fp32_under_bf16_autocast(monkeypatch):
    """Without FSDP, autocast would run dt_proj in bf16; delta must be the fp32 product."""
    torch.manual_seed(0)
    config = dict(BASE, mixer_pattern="M", mlp_pattern="D", num_hidden_layers=1)
    model = HybridLM(ModelConfig(**config))
    mixer = model.layers[0].mixer
    seen = {}
    scan = mamba_module.selective_scan

    def recording_scan(u, delta, *args, **kwargs):
        seen["delta"] = delta
        return scan(u, delta, *args, **kwargs)

    monkeypatch.setattr(mamba_module, "selective_scan", recording_scan)
    mixer.x_proj.register_forward_hook(lambda m, i, out: seen.update(x_proj=out))
    ids = torch.randint(0, 61, (2, 12))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(ids)
    dt = seen["x_proj"][..., : mixer.dt_rank]  # (B, T, R) as autocast produced it
    w, b = mixer.dt_proj.weight.detach(), mixer.dt_proj.bias.detach()
    fp32 = F.softplus(F.linear(dt.float(), w, b))
    bf16 = F.softplus(F.linear(dt, w.bfloat16(), b.bfloat16()).float())
    gap = (bf16 - fp32).abs().max()
    assert seen["delta"].dtype == torch.float32
    assert gap > 0  # a bf16 product would be visible at this tolerance
    torch.testing.assert_close(seen["delta"], fp32, rtol=0, atol=float(gap) / 100)
