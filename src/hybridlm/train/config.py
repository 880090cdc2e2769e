"""TrainConfig: everything that describes a run, from one YAML/JSON file plus overrides.

    hybridlm train --config run.yaml --set lr=1e-3 --set model.routing=zipf

The resolved config is saved into the run directory (`train_config.json`); resuming compares
it with the saved one and refuses when a field that changes the run's meaning differs.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from hybridlm.config import PRESETS

SCHEDULES = ("cosine", "wsd", "restarts")
TASKS = ("pretrain", "sft")
PARALLEL = ("none", "ddp", "fsdp")

# Fields a resumed run may change: where and how often things are written, the hardware
# layout (world size and micro-batch, as long as the global batch is the same), the length
# (`steps`, which every LR schedule depends on: the trainer refuses a change unless asked to
# reschedule).
RESUMABLE_CHANGES = frozenset({
    "out", "eval_every", "eval_batches", "checkpoint_every", "keep_checkpoints", "log_every",
    "device", "max_minutes", "compile", "parallel", "micro_batch_size", "steps", "progress",
})


@dataclass
class TrainConfig:
    data: str  # prepared data directory (`hybridlm data prepare`)
    out: str  # run directory: checkpoints, metrics, the final model
    task: str = "pretrain"  # "pretrain" (prepared token shards) | "sft" (a jsonl of chats)
    init_from: str | None = None  # start from this model directory instead of a preset
    preset: str = "tiny"  # ModelConfig preset
    model: dict[str, Any] = field(default_factory=dict)  # ModelConfig field overrides
    steps: int = 300  # optimizer steps
    global_batch_size: int = 16  # sequences per optimizer step, over all ranks
    micro_batch_size: int | None = None  # sequences per rank per forward; None: no accumulation
    seq_len: int = 256  # tokens per sequence
    lr: float = 1e-3  # peak learning rate
    min_lr_ratio: float = 0.1  # floor of every schedule, as a fraction of lr
    warmup_steps: int = 30  # linear warmup (also after each warm restart)
    schedule: str = "cosine"  # "cosine" | "wsd" (warmup-stable-decay) | "restarts"
    decay_fraction: float = 0.2  # wsd: share of the run spent decaying linearly at the end
    restart_steps: list[int] = field(default_factory=list)  # restarts: steps that re-warm
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # max global gradient norm; <= 0 disables clipping
    max_bad_steps: int = 5  # stop after this many non-finite losses/gradients in a row
    eval_every: int = 100  # held-out loss every K steps (and at the end)
    eval_batches: int = 8  # validation batches per evaluation
    log_every: int = 1  # metrics record every K steps
    checkpoint_every: int = 100  # resumable checkpoint every N steps (and at the end)
    keep_checkpoints: int = 2  # keep the last K checkpoints
    max_minutes: float | None = None  # checkpoint and stop after this wall time
    seed: int = 0
    device: str = "auto"  # "auto" | "cpu" | "cuda"
    compile: bool = False  # torch.compile each block
    parallel: str = "none"  # "none" | "ddp" | "fsdp" (under torchrun)
    progress: bool = True  # progress bar on rank 0

    def validate(self) -> None:
        for name in ("steps", "global_batch_size", "seq_len", "eval_every", "eval_batches",
                     "log_every", "checkpoint_every", "keep_checkpoints", "max_bad_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer")
        if self.seq_len < 2:
            raise ValueError(f"seq_len={self.seq_len} must be >= 2 (one input, one target)")
        if self.micro_batch_size is not None and self.micro_batch_size < 1:
            raise ValueError(f"micro_batch_size={self.micro_batch_size} must be >= 1 or None")
        if not self.lr > 0:
            raise ValueError(f"lr={self.lr} must be > 0")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps={self.warmup_steps} must be >= 0")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio={self.min_lr_ratio} must lie in [0, 1]")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule={self.schedule!r} is not one of {list(SCHEDULES)}")
        if not 0 < self.decay_fraction <= 1:
            raise ValueError(f"decay_fraction={self.decay_fraction} must lie in (0, 1]")
        if self.schedule == "restarts":
            steps = self.restart_steps
            if not steps or sorted(set(steps)) != list(steps) or steps[0] <= 0:
                raise ValueError(
                    f"restart_steps={steps!r} must be a non-empty increasing list of steps > 0 "
                    "for schedule='restarts'"
                )
        if self.task not in TASKS:
            raise ValueError(f"task={self.task!r} is not one of {list(TASKS)}")
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; allowed: {sorted(PRESETS)}")
        if self.parallel not in PARALLEL:
            raise ValueError(f"parallel={self.parallel!r} is not one of {list(PARALLEL)}")

    def accumulation_steps(self, world_size: int) -> int:
        """Micro-batches per optimizer step on each rank; refuses impossible combinations."""
        micro = self.micro_batch_size or self.global_batch_size // world_size
        if micro < 1 or self.global_batch_size % (micro * world_size):
            raise ValueError(
                f"global_batch_size={self.global_batch_size} is not divisible by "
                f"micro_batch_size={self.micro_batch_size or micro} x world_size={world_size}"
            )
        return self.global_batch_size // (micro * world_size)

    def per_rank_micro_batch(self, world_size: int) -> int:
        return self.global_batch_size // (world_size * self.accumulation_steps(world_size))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    def differences(self, other: TrainConfig) -> list[str]:
        """Fields that differ and matter for resuming: 'name: saved -> new'."""
        mine, theirs = self.to_dict(), other.to_dict()
        return [f"{k}: {theirs[k]!r} -> {mine[k]!r}" for k in sorted(mine)
                if k not in RESUMABLE_CHANGES and mine[k] != theirs[k]]


def _set_override(data: dict[str, Any], key: str, value: Any) -> None:
    """Apply `key=value`; `model.field=value` sets a ModelConfig override."""
    if key.startswith("model."):
        data.setdefault("model", {})[key[len("model."):]] = value
        return
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    if key not in known:
        raise ValueError(f"unknown training field {key!r}; known: {sorted(known)}")
    data[key] = value


def parse_value(text: str) -> Any:
    """YAML scalar parsing: 1e-3 -> float, true -> bool, [1, 2] -> list, zipf -> str."""
    return yaml.safe_load(text) if text != "" else ""


def load_train_config(path: str | Path | None, overrides: dict[str, Any] | None = None,
                      set_args: list[str] | None = None) -> TrainConfig:
    """Read a YAML/JSON run file (optional), then apply `overrides` and `--set key=value`."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"run config {path} does not exist")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ValueError(f"run config {path} is not valid YAML/JSON: {err}") from err
        if not isinstance(data, dict):
            raise ValueError(f"run config {path} must hold a mapping of fields, got {data!r}")
        for key in list(data):
            if key != "model":
                _set_override(data, key, data.pop(key))
    for key, value in (overrides or {}).items():
        if value is not None:
            _set_override(data, key, value)
    for item in set_args or []:
        if "=" not in item:
            raise ValueError(f"--set expects key=value, got {item!r}")
        key, text = item.split("=", 1)
        _set_override(data, key.strip(), parse_value(text))
    missing = [k for k in ("data", "out") if k not in data]
    if missing:
        raise ValueError(f"the run needs {missing} (in the config file or as flags)")
    cfg = TrainConfig(**data)
    cfg.validate()
    return cfg
