"""TrainConfig: everything that describes a run, from one YAML/JSON file plus overrides.

    hybridlm train --config run.yaml --set lr=1e-3 --set model.tr_routing=zipf

The resolved config is saved into the run directory (`train_config.json`); resuming compares
it with the saved one and refuses when a field that changes the run's meaning differs. Every
field (and every `model:` override, by its ModelConfig field) is checked by its type and its
rule in FIELD_RULES, however the config is made; a bad one raises `ConfigError` naming it.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from hybridlm.config import PRESETS, ModelConfig, check_model_mapping
from hybridlm.config_check import (
    ConfigError,
    Rule,
    as_typed,
    at_least,
    check_fields,
    check_value,
    field_types,
    non_empty,
    one_of,
    shorten,
    unknown_fields_message,
    within,
)

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
    "activation_checkpointing",
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
    compile: bool = False  # torch.compile the model (fullgraph; per block under FSDP)
    activation_checkpointing: bool = False  # recompute each block in backward: less memory
    #                                         for long sequences, about one more forward
    parallel: str = "none"  # "none" | "ddp" | "fsdp" (under torchrun)
    progress: bool = True  # progress bar on rank 0

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        check_fields(self, FIELD_RULES)  # every field's type and range, see FIELD_RULES
        # Relations between fields:
        if self.compile and self.activation_checkpointing:
            raise ConfigError(
                "compile=true with activation_checkpointing=true is not supported: a compiled "
                "checkpointed block cannot update the MoE load counts; choose one of the two"
            )
        if self.schedule == "restarts":
            steps = self.restart_steps
            if not steps or sorted(set(steps)) != list(steps):
                raise ConfigError(
                    f"restart_steps={shorten(steps)} must be a non-empty increasing list of "
                    "steps > 0 for schedule='restarts'"
                )
        if self.preset not in PRESETS:
            raise ConfigError(f"unknown preset {shorten(self.preset)}; allowed: "
                              f"{sorted(PRESETS)}")
        self._validate_model_overrides()

    def _validate_model_overrides(self) -> None:
        """Each override by its ModelConfig field, then the preset with the overrides as a
        whole (num_experts must divide the preset's intermediate_size, ...), so a bad model
        is refused when the run is read, before any data is loaded."""
        self.model = check_model_mapping(self.model, what="model", prefix="model.")
        if self.init_from is not None:
            if self.model:
                raise ConfigError(
                    f"model overrides {sorted(self.model)} have no effect with init_from="
                    f"{self.init_from!r}: the model directory's config.json decides its shape"
                )
            return
        try:
            ModelConfig.from_preset(self.preset, **self.model)
        except ConfigError as err:
            raise ConfigError(f"model (preset {self.preset!r} with the run's overrides): "
                              f"{err}") from None

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


# What each field allows beyond its type (the annotation); TrainConfig.validate checks both
# through hybridlm.config_check, then the relations between fields.
_POSITIVE = at_least(1)
FIELD_RULES: dict[str, Rule] = {
    **dict.fromkeys(("data", "out", "init_from", "device"), non_empty),
    "task": one_of(TASKS),
    **dict.fromkeys(("steps", "global_batch_size", "micro_batch_size", "max_bad_steps",
                     "eval_every", "eval_batches", "log_every", "checkpoint_every",
                     "keep_checkpoints"), _POSITIVE),
    "seq_len": at_least(2, why="one input, one target"),
    "lr": at_least(0, strict=True),
    "min_lr_ratio": within(0, 1),
    "warmup_steps": at_least(0),
    "schedule": one_of(SCHEDULES),
    "decay_fraction": within(0, 1, low_open=True),
    "restart_steps": at_least(1),  # each entry
    "weight_decay": at_least(0),
    "beta1": within(0, 1, high_open=True),
    "beta2": within(0, 1, high_open=True),
    "max_minutes": at_least(0, strict=True),
    # seeds that torch.manual_seed and numpy's generators both take
    "seed": lambda seed: None if 0 <= seed < 2**63 else "must lie in [0, 2**63)",
    "parallel": one_of(PARALLEL),
}


class _RunFileLoader(yaml.SafeLoader):
    """YAML as in PyYAML, except that exponent floats without a dot (1e-3, 3E5) are floats,
    as in JSON and YAML 1.2: `lr: 1e-3` and `--set lr=1e-3` mean a number."""


_RunFileLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _read_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_RunFileLoader)  # a SafeLoader: plain data only


def _set_override(data: dict[str, Any], key: Any, value: Any, source: str = "") -> None:
    """Apply `key=value` from `source` (named in errors, if given); `model.field=value` sets a
    ModelConfig override. Each value is checked by its field's type and range here, where
    its source is known; the run as a whole is checked when the TrainConfig is made."""
    try:
        if isinstance(key, str) and key.startswith("model."):
            name = key[len("model."):]
            data["model"] = {**data.get("model", {}),
                             **check_model_mapping({name: value}, what="model",
                                                   prefix="model.")}
            return
        hints = field_types(TrainConfig)
        if key not in hints:
            raise ConfigError(unknown_fields_message("training", [key], hints)
                              + f"; known: {sorted(hints)}")
        if key == "model":
            value = check_model_mapping(value, what="model", prefix="model.")
        data[key] = check_value(key, value, hints[key], FIELD_RULES.get(key))
    except ConfigError as err:
        if not source:
            raise
        raise ConfigError(f"{source}: {err}") from None


def parse_value(text: str) -> Any:
    """YAML scalar parsing: 1e-3 -> float, true -> bool, [1, 2] -> list, zipf -> str; text
    that is not valid YAML stays the string it is."""
    if text == "":
        return ""
    try:
        return _read_yaml(text)
    except yaml.YAMLError:
        return text


def set_value(key: str, text: str) -> Any:
    """The value of `--set key=text`: YAML, except that a string field takes the text as
    typed (`out=2024` names a directory; YAML would make it an int), null still None."""
    value = parse_value(text)
    if value is None:
        return value
    cls, name = (ModelConfig, key[len("model."):]) if key.startswith("model.") else (
        TrainConfig, key)
    hint = field_types(cls).get(name)
    return text if hint in (str, str | None) else value


def _read_run_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"run config {path} does not exist")
    try:
        data = _read_yaml(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        one_line = " ".join(str(err).split())
        raise ConfigError(f"run config {path} is not valid YAML/JSON: {one_line}") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"run config {path} must hold a mapping of fields, got "
                          f"{shorten(data)}")
    checked: dict[str, Any] = {}
    for key, value in data.items():
        _set_override(checked, key, value, source=f"run config {path}")
    return checked


def load_train_config(path: str | Path | None, overrides: dict[str, Any] | None = None,
                      set_args: list[str] | None = None) -> TrainConfig:
    """Read a YAML/JSON run file (optional), then apply `overrides` and `--set key=value`."""
    data = _read_run_file(path) if path is not None else {}
    for key, value in (overrides or {}).items():
        if value is not None:
            _set_override(data, key, value)  # the checker's message names the field
    for item in set_args or []:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {as_typed(item)}")
        key, text = item.split("=", 1)
        key = key.strip()
        _set_override(data, key, set_value(key, text), source=f"--set {as_typed(item)}")
    missing = [k for k in ("data", "out") if k not in data]
    if missing:
        raise ConfigError(f"the run needs {missing} (in the config file or as flags)")
    return TrainConfig(**data)
