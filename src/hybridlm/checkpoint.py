"""Model directories: config.json + model.safetensors (no pickle, so loading is safe).

Writes go to a temporary sibling directory that is renamed into place, so a crash never
leaves a half-written model. Loading checks every tensor name and shape and reports all
problems at once.

Imports point one way: this module builds on the model (`load_model` constructs one);
`HybridLM.save_pretrained` / `from_pretrained` are thin wrappers that import it only when
called, so importing the model loads no IO code and no module imports the other back.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from hybridlm.config import ModelConfig
from hybridlm.config_check import ConfigError
from hybridlm.config_legacy import upgrade
from hybridlm.model import HybridLM
from hybridlm.outputs import entries, link_or_copy, staged_dir

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


class CheckpointError(ValueError):
    """A model directory is missing, damaged, or does not match its config."""


def _tensors_to_save(model: HybridLM) -> dict[str, torch.Tensor]:
    state = model.state_dict()
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # the same storage as embed_tokens.weight
    return {name: t.detach().contiguous().cpu() for name, t in state.items()}


def save_model(model: HybridLM, directory: str | Path) -> None:
    """Write config.json + model.safetensors into a new directory that then replaces
    `directory` (hybridlm.outputs.staged_dir). Other files of an existing directory
    (tokenizer.json, trainer state) are kept: hard-linked (or copied) into the new one, never
    moved out of the old one, which is deleted only once the new one is in place."""
    directory = Path(directory)
    with staged_dir(directory, replace=True) as staging:
        (staging / CONFIG_NAME).write_text(model.config.to_json() + "\n")
        save_file(_tensors_to_save(model), str(staging / WEIGHTS_NAME), metadata={"format": "pt"})
        if staging.parent != directory and directory.is_dir():
            for name, extra in entries(directory).items():
                if name not in (CONFIG_NAME, WEIGHTS_NAME):
                    link_or_copy(extra, staging / name)


def load_config(directory: str | Path) -> ModelConfig:
    """The ModelConfig of a model directory; a config.json written before the fields were
    renamed is read through `config_legacy.upgrade` (the same model, today's names)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"model directory {str(directory)!r} does not exist")
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: not a hybridlm model directory")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
        raise CheckpointError(f"{path} is damaged: {err}") from err
    try:
        return ModelConfig.from_dict(upgrade(data))  # every field checked by type and range
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


def load_weights(model: HybridLM, directory: str | Path) -> None:
    """Load `directory/model.safetensors` into an existing model, checking every name and
    shape and reporting all problems at once."""
    weights = Path(directory) / WEIGHTS_NAME
    if not weights.is_file():
        raise CheckpointError(f"{weights} is missing")
    device = next(model.parameters()).device
    try:
        state = load_file(str(weights), device=str(device))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{weights} is damaged or unreadable: {err}") from err
    _check_shapes(weights, {name: tuple(t.shape) for name, t in state.items()}, model)
    model.load_state_dict(state, strict=False)


def check_weights(model: HybridLM, directory: str | Path) -> None:
    """What `load_weights` would refuse (a missing, damaged or truncated file; names or shapes
    that do not match the model), found from the file's header without reading a tensor: a
    resume checks its checkpoint this way before it writes anything."""
    weights = Path(directory) / WEIGHTS_NAME
    if not weights.is_file():
        raise CheckpointError(f"{weights} is missing")
    try:  # the header is checked against the file's size: a truncated file fails here
        with safe_open(str(weights), framework="pt") as file:
            shapes = {name: tuple(file.get_slice(name).get_shape()) for name in file.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{weights} is damaged or unreadable: {err}") from err
    _check_shapes(weights, shapes, model)


def _check_shapes(weights: Path, found: dict[str, tuple[int, ...]], model: HybridLM) -> None:
    """Every tensor name and shape of `weights` against the model's, all problems at once."""
    expected = {name: tuple(t.shape) for name, t in _tensors_to_save(model).items()}
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong_shape = sorted(
        f"{name}: file {found[name]} vs model {expected[name]}"
        for name in set(expected) & set(found) if found[name] != expected[name]
    )
    if missing or unexpected or wrong_shape:
        raise CheckpointError(
            f"{weights} does not match {CONFIG_NAME}: missing tensors {missing}, "
            f"unexpected tensors {unexpected}, wrong shapes {wrong_shape}"
        )


def load_model(
    cls: type[HybridLM], directory: str | Path, device: str | torch.device = "cpu"
) -> HybridLM:
    """`cls` (HybridLM or a subclass) built from `directory/config.json`, on `device`, with
    the weights of `directory/model.safetensors`."""
    config = load_config(directory)
    model = cls(config).to(device)
    load_weights(model, directory)
    return model
