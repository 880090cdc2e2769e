"""Where a model directory keeps its weights: one `model.safetensors`, or shards.

A model larger than `max_shard_size` is written in the sharded layout that transformers also
reads: `model-00001-of-0000N.safetensors` ... plus `model.safetensors.index.json`,
{"metadata": {"total_size": bytes}, "weight_map": {tensor name: shard file name}}.
This module knows the names, plans the shards and reads the index; it touches no tensor data
(hybridlm.checkpoint does the writing and loading).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_SIZE = "5GB"
_SHARD_NAME = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")
# Decimal units as disk sizes are quoted (and as transformers reads them); binary ones too.
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B)\s*$", re.IGNORECASE)


class CheckpointError(ValueError):
    """A model directory is missing, damaged, or does not match its config (defined here, the
    module both the loader and the layout code import; hybridlm.checkpoint re-exports it)."""


def parse_size(value: int | str, name: str = "max_shard_size") -> int:
    """A positive size in bytes from an int (bytes) or a string such as "5GB", "500MB",
    "2GiB" (KB/MB/GB/TB decimal, KiB/MiB/GiB/TiB binary)."""
    allowed = 'a positive int of bytes or a string like "5GB", "500MB", "2GiB"'
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"{name}={value!r} is not a size: give {allowed}")
    if isinstance(value, int):
        size = value
    else:
        match = _SIZE.match(value)
        if match is None:
            raise ValueError(f"{name}={value!r} is not a size: give {allowed}")
        size = int(float(match[1]) * _UNITS[match[2].upper()])
    if size <= 0:
        raise ValueError(f"{name}={value!r} must be positive: give {allowed}")
    return size


def is_weight_file(name: str) -> bool:
    """Whether `name` is one of the files that hold a model directory's weights (either
    layout): a save replaces all of them, so no shard of an earlier save survives beside
    the new weights."""
    return name in (WEIGHTS_NAME, INDEX_NAME) or _SHARD_NAME.match(name) is not None


def shard_name(index: int, count: int) -> str:
    """The file name of shard `index` (0-based) of `count`: model-00001-of-00003.safetensors."""
    return f"model-{index + 1:05d}-of-{count:05d}.safetensors"


def plan_shards(sizes: dict[str, int], max_bytes: int) -> list[list[str]]:
    """Tensor names (in the given order) grouped into shards of at most `max_bytes` each; a
    tensor larger than `max_bytes` gets a shard of its own (a tensor is never split)."""
    shards: list[list[str]] = [[]]
    filled = 0
    for name, size in sizes.items():
        if shards[-1] and filled + size > max_bytes:
            shards.append([])
            filled = 0
        shards[-1].append(name)
        filled += size
    return shards


def index_json(weight_map: dict[str, str], total_size: int) -> str:
    return json.dumps({"metadata": {"total_size": total_size}, "weight_map": weight_map},
                      indent=2, sort_keys=True) + "\n"


def weight_files(directory: str | Path) -> dict[str, Path]:
    """Tensor name -> file of a model directory, from its index when sharded; for a single
    `model.safetensors` the empty dict (its names are in the file). Raises CheckpointError
    when no weights are there, both layouts are, or the index is damaged or names a shard
    that is missing."""
    directory = Path(directory)
    single, index = directory / WEIGHTS_NAME, directory / INDEX_NAME
    if single.is_file() and index.is_file():
        raise CheckpointError(
            f"{directory} holds both {WEIGHTS_NAME} and {INDEX_NAME}: which weights are the "
            "model's is ambiguous; move the stale one away")
    if single.is_file():
        return {}
    if not index.is_file():
        raise CheckpointError(f"{single} is missing (and no {INDEX_NAME} either)")
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        if not isinstance(weight_map, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
            raise TypeError("weight_map is not a mapping of tensor names to file names")
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
        raise CheckpointError(f"{index} is damaged: {type(err).__name__}: {err}") from None
    files = {file: directory / file for file in set(weight_map.values())}
    outside = sorted(f for f, p in files.items() if p.parent != directory or "/" in f)
    if outside:
        raise CheckpointError(f"{index} names files outside the directory: {outside}")
    missing = sorted(f for f, p in files.items() if not p.is_file())
    if missing:
        raise CheckpointError(f"{index} names shards that are missing: {missing}")
    return {name: files[file] for name, file in weight_map.items()}
