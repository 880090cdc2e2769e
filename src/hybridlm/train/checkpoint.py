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

import pickle
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from hybridlm.checkpoint import CheckpointError, load_weights
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
    """Write the checkpoint of `step` atomically. `dist` (a hybridlm.parallel.DistContext)
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


def read_trainer_state(path: str | Path) -> dict[str, Any]:
    """The trainer state of a checkpoint directory (step, RNG, counters and, unless the model
    was sharded, the optimizer). A damaged file raises CheckpointError naming it, so a resume
    can be refused before it writes anything."""
    file = Path(path) / STATE_NAME
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, EOFError, RuntimeError, ValueError) as err:
        # torch raises these for a truncated, empty or foreign file; their text is long
        raise CheckpointError(
            f"{file} is damaged or unreadable ({type(err).__name__}); move {Path(path).name} "
            "aside to resume from the checkpoint before it"
        ) from None
    missing = sorted({"step", "rng"} - set(state)) if isinstance(state, dict) else ["step"]
    if missing:
        raise CheckpointError(f"{file} is not a trainer state: it lacks {missing}")
    return state


def load_checkpoint(
    path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, dist: Any = None,
    state: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Restore model and optimizer in place from a checkpoint; returns the trainer state.
    `state`: the checkpoint's trainer state if already read (`read_trainer_state`); its
    optimizer and RNG entries are consumed (popped), so the caller holds no second copy."""
    path = Path(path)
    state = read_trainer_state(path) if state is None else state
    if dist is not None and dist.sharded:
        dist.load_sharded(model, optimizer, path / "dcp")
    else:
        load_weights(dist.unwrap(model) if dist else model, path)
        if "optimizer" not in state:
            raise CheckpointError(f"{path / STATE_NAME} holds no optimizer state")
        optimizer.load_state_dict(state.pop("optimizer"))
    set_rng_state(state.pop("rng"))
    return state
