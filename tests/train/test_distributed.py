"""DDP and FSDP2 under torchrun on CPU (gloo, 2 processes) against one process with the same
global batch; FSDP checkpoints resume at a different world size."""

import json
import os
import subprocess
import sys

import pytest

from hybridlm.train import TrainConfig, train

SMALL = {"hidden_size": 32, "num_hidden_layers": 2, "intermediate_size": 128,
         "max_position_embeddings": 64, "mixer_pattern": "AM", "mlp_type": "moe",
         "moe_balance": "aux_free", "mamba_d_state": 4}
COMMON = ["--preset", "tiny", "--batch-size", "4", "--seq-len", "32", "--lr", "3e-3",
          "--warmup-steps", "1", "--eval-every", "100", "--eval-batches", "1",
          "--checkpoint-every", "2", "--set", "progress=false"]


def _overrides() -> list[str]:
    return [x for k, v in SMALL.items() for x in ("--set", f"model.{k}={v}")]


def torchrun(nproc: int, data, out, *extra: str) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           "--standalone", "-m", "hybridlm.train", "--data", str(data), "--out", str(out),
           *COMMON, *_overrides(), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]


def losses(run_dir) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").open()]


@pytest.fixture(scope="module")
def single_process(prepared_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "run"
    cfg = TrainConfig(data=str(prepared_dir), out=str(out), preset="tiny", model=dict(SMALL),
                      steps=4, global_batch_size=4, seq_len=32, lr=3e-3, warmup_steps=1,
                      eval_every=100, eval_batches=1, checkpoint_every=2, progress=False)
    train(cfg)
    return out


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_match_one_process_with_the_same_global_batch(
        parallel, prepared_dir, single_process, tmp_path):
    torchrun(2, prepared_dir, tmp_path / "run", "--steps", "4", "--parallel", parallel)
    assert losses(tmp_path / "run") == pytest.approx(losses(single_process), rel=2e-4)
    # rank 0 alone wrote the metrics and a loadable model directory
    assert len(losses(tmp_path / "run")) == 4
    from hybridlm import HybridLM

    HybridLM.from_pretrained(tmp_path / "run")


def test_fsdp_checkpoint_resumes_at_a_different_world_size(prepared_dir, single_process,
                                                           tmp_path):
    out = tmp_path / "run"
    torchrun(2, prepared_dir, out, "--steps", "2", "--parallel", "fsdp")
    assert (out / "checkpoints" / "step_00000002" / "dcp").is_dir()
    torchrun(1, prepared_dir, out, "--steps", "4", "--parallel", "fsdp", "--resume")
    assert losses(out) == pytest.approx(losses(single_process), rel=2e-4)
