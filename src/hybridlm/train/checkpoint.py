"""Resumable training checkpoints that never lose work.

    RUN/checkpoints/step_00000100/
        config.json, model.safetensors, tokenizer.json   a loadable model directory
        trainer_state.pt                                 step, optimizer, RNG, counters
        dcp/                                             FSDP: sharded model + optimizer

A checkpoint is written into `RUN/checkpoints/.tmp-step_N` and renamed into place only once
complete, so a process killed mid-write (even by SIGKILL) leaves the previous checkpoint
as it was; `latest_checkpoint` never returns a temporary directory. Only the last K are kept.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import torch

from hybridlm.checkpoint import load_weights
from hybridlm.outputs import move_into_place

STATE_NAME = "trainer_state.pt"
_STEP_DIR = re.compile(r"^step_(\d{8})$")


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _STEP_DIR.match(p.name) and (p / STATE_NAME).is_file()]
    return sorted(found, key=lambda p: p.name)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def checkpoint_step(path: str | Path) -> int:
    """The number of optimizer steps done when a checkpoint (RUN/checkpoints/step_N) was
    written."""
    match = _STEP_DIR.match(Path(path).name)
    if match is None:
        raise ValueError(f"{path} is not a checkpoint directory (step_NNNNNNNN)")
    return int(match.group(1))


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    *,
    extra_files: list[Path] = (),
    keep: int = 2,
    dist: Any = None,
) -> Path:
    """Write the checkpoint of `step` atomically. `dist` (a train.distributed.DistContext)
    decides who writes: rank 0 alone, or every rank through torch.distributed.checkpoint
    when the model is sharded (FSDP). Returns the final directory."""
    root = checkpoint_dir(run_dir)
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp-step_{step:08d}"
    is_main = dist is None or dist.is_main
    if is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    sharded = dist is not None and dist.sharded
    if sharded:
        dist.barrier()
        dist.save_sharded(model, optimizer, tmp / "dcp")
        full_model = dist.full_model_copy(model)  # gathered on every rank, kept on rank 0
    if is_main:
        plain = full_model if sharded else (dist.unwrap(model) if dist else model)
        plain.save_pretrained(tmp)
        for extra in extra_files:  # tokenizer.json, chat_template.json: a complete model dir
            shutil.copyfile(extra, tmp / Path(extra).name)
        payload = {**state, "step": step, "rng": rng_state()}
        if not sharded:
            payload["optimizer"] = optimizer.state_dict()
        torch.save(payload, tmp / STATE_NAME)
        move_into_place(tmp, final)  # a checkpoint of the same step: replaced, never lost
        for old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    if dist is not None:
        dist.barrier()
    return final


def load_checkpoint(
    path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, dist: Any = None
) -> dict[str, Any]:
    """Restore model and optimizer in place from a checkpoint; returns the trainer state."""
    path = Path(path)
    state = torch.load(path / STATE_NAME, map_location="cpu", weights_only=True)
    if dist is not None and dist.sharded:
        dist.load_sharded(model, optimizer, path / "dcp")
    else:
        load_weights(dist.unwrap(model) if dist else model, path)
        optimizer.load_state_dict(state.pop("optimizer"))
    set_rng_state(state.pop("rng"))
    return state
