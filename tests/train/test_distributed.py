"""DDP and FSDP2 under torchrun on CPU (gloo, 2 processes) against one process with the same
global batch, losses and MoE balancing biases; FSDP checkpoints resume at a different world
size."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hybridlm import HybridLM
from hybridlm.train import TrainConfig, train

WORKER = Path(__file__).with_name("train_worker.py")

SMALL = {"hidden_size": 32, "num_hidden_layers": 2, "intermediate_size": 128,
         "max_position_embeddings": 64, "mixer_pattern": "AM", "mlp_pattern": "E",
         "moe_balance": "aux_free", "moe_aux_free_rate": 0.01, "mamba_d_state": 4}
COMMON = ["--preset", "tiny", "--batch-size", "4", "--seq-len", "32", "--lr", "3e-3",
          "--warmup-steps", "1", "--eval-every", "100", "--eval-batches", "1",
          "--checkpoint-every", "2", "--set", "progress=false"]


def _overrides() -> list[str]:
    return [x for k, v in SMALL.items() for x in ("--set", f"model.{k}={v}")]


def torchrun(nproc: int, data, out, *extra: str, never_reduce: bool = False) -> list[dict]:
    """`python -m hybridlm.train` under torchrun; returns each rank's balancing report (see
    train_worker.py). never_reduce: the breakage, expert loads never summed over ranks."""
    reports = Path(f"{out}_reports")
    reports.mkdir(exist_ok=True)
    for stale in reports.glob("rank*.json"):  # an earlier leg's reports prove nothing here
        stale.unlink()
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           "--standalone", str(WORKER), str(reports), *(["--never-reduce"] * never_reduce),
           "--data", str(data), "--out", str(out), *COMMON, *_overrides(), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    written = all((reports / f"rank{r}.json").exists() for r in range(nproc))
    # A rank writes its report only after its training returned 0. On a loaded 2-core box a
    # gloo thread is sometimes still joinable when that process exits, and the C++ runtime
    # aborts it after the work is done ("terminate called without an active exception");
    # that exit is not the trainer's failure, anything else is.
    teardown_abort = "terminate called without an active exception" in done.stderr
    assert done.returncode == 0 or (written and teardown_abort), done.stderr[-3000:]
    return [json.loads((reports / f"rank{r}.json").read_text()) for r in range(nproc)]


def losses(run_dir) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").open()]


def saved_biases(run_dir) -> dict[str, torch.Tensor]:
    model = HybridLM.from_pretrained(run_dir)
    return {n: b for n, b in model.named_buffers() if n.endswith("expert_bias")}


def assert_biases_equal(biases: dict, expected: dict[str, torch.Tensor]) -> None:
    """Equal to a tenth of one aux-free step (gamma): one step's sign flipped shows."""
    gamma = SMALL["moe_aux_free_rate"]
    assert sorted(biases) == sorted(expected)
    for name, bias in biases.items():
        torch.testing.assert_close(torch.as_tensor(bias), expected[name], rtol=0,
                                   atol=gamma / 10)


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
    reports = torchrun(2, prepared_dir, tmp_path / "run", "--steps", "4", "--parallel", parallel)
    assert losses(tmp_path / "run") == pytest.approx(losses(single_process), rel=2e-4)
    # Each rank routes its own half of the batch: the local expert loads differ...
    first, second = (r["first_local_loads"] for r in reports)
    assert first != second
    # ...yet every rank's biases move by the summed load, as one process's over the batch.
    single = saved_biases(single_process)
    assert any(bias.abs().sum() > 0 for bias in single.values())
    for report in reports:
        assert_biases_equal(report["expert_bias"], single)
    # rank 0 alone wrote the metrics and a loadable model directory
    assert len(losses(tmp_path / "run")) == 4
    from hybridlm import HybridLM

    HybridLM.from_pretrained(tmp_path / "run")


def test_fsdp_checkpoint_resumes_at_a_different_world_size(prepared_dir, single_process,
                                                           tmp_path):
    out = tmp_path / "run"
    torchrun(2, prepared_dir, out, "--steps", "2", "--parallel", "fsdp")
    assert (out / "checkpoints" / "step_00000002" / "dcp").is_dir()
    # Extending 2 -> 4 steps changes no LR of steps 1-2 here (warmup 1, then the cosine
    # starts at its peak whatever the length), so the legs match one 4-step run.
    torchrun(1, prepared_dir, out, "--steps", "4", "--parallel", "fsdp", "--resume",
             "--reschedule")
    assert losses(out) == pytest.approx(losses(single_process), rel=2e-4)
    assert_biases_equal(saved_biases(out), saved_biases(single_process))


@pytest.mark.slow
def test_biases_from_per_rank_loads_are_noticed(prepared_dir, single_process, tmp_path):
    """The breakage the balancing checks above must catch: loads never summed over ranks."""
    reports = torchrun(2, prepared_dir, tmp_path / "run", "--steps", "4", "--parallel", "ddp",
                       never_reduce=True)
    single = saved_biases(single_process)
    for report in reports:
        with pytest.raises(AssertionError):
            assert_biases_equal(report["expert_bias"], single)
