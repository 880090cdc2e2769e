"""Checkpoints survive the ways real runs die: SIGKILL mid-write, SIGTERM/SIGINT."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import torch

from hybridlm import HybridLM, ModelConfig
from hybridlm.train.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint
from hybridlm.train.optim import build_optimizer

WRITER = textwrap.dedent("""
    import sys, torch
    from hybridlm import HybridLM, ModelConfig
    from hybridlm.train.checkpoint import save_checkpoint
    from hybridlm.train.optim import build_optimizer
    torch.manual_seed(0)
    model = HybridLM(ModelConfig.from_preset("tiny"))
    opt = build_optimizer(model, 1e-3)
    model(torch.zeros(1, 4, dtype=torch.long), labels=torch.zeros(1, 4, dtype=torch.long)
          ).loss.backward()
    opt.step()
    for step in range(1, 10000):
        save_checkpoint(sys.argv[1], step, model, opt, {"skipped_steps": 0}, keep=2)
""")


def _fresh():
    model = HybridLM(ModelConfig.from_preset("tiny"))
    return model, build_optimizer(model, 1e-3)


def test_sigkill_while_writing_leaves_the_previous_checkpoint_loadable(tmp_path):
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    for attempt in range(3):
        run = tmp_path / f"run{attempt}"
        proc = subprocess.Popen([sys.executable, str(script), str(run)])
        deadline = time.time() + 120
        while len(list_checkpoints(run)) < 2 and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(0.037 * (attempt + 1))  # land somewhere inside a later write
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        latest = latest_checkpoint(run)
        assert latest is not None
        model, opt = _fresh()
        state = load_checkpoint(latest, model, opt)
        assert state["step"] == int(latest.name.split("_")[1])
        assert all(torch.isfinite(p).all() for p in model.parameters())
        assert len(opt.state) > 0  # the optimizer's moments came back too


def test_sigterm_checkpoints_and_stops_cleanly_then_resumes(prepared_dir, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "hybridlm.train", "--data", str(prepared_dir), "--out",
           str(out), "--preset", "tiny", "--steps", "120", "--batch-size", "2", "--seq-len",
           "32", "--checkpoint-every", "1000", "--set", "model.hidden_size=32",
           "--set", "model.num_hidden_layers=1", "--set", "model.intermediate_size=64",
           "--set", "progress=false"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while (not metrics.exists() or len(metrics.read_text().splitlines()) < 3) and (
            time.time() < deadline):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    stdout, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0
    result = json.loads(stdout.strip().splitlines()[-1])
    assert result["stopped"] == "signal" and 3 <= result["steps"] < 120
    assert latest_checkpoint(out).name == f"step_{result['steps']:08d}"
    resume_cmd = [("123" if arg == "120" else arg) for arg in cmd] + ["--resume",
                                                                      "--reschedule"]
    resumed = subprocess.run(resume_cmd, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    steps = [json.loads(line)["step"] for line in metrics.open()]
    assert steps == list(range(1, 124))
