"""Model directories: config.json + weights in safetensors (no pickle, so loading is safe).

The weights are one `model.safetensors`, or, for a model larger than `max_shard_size`, the
sharded layout transformers also reads (hybridlm.checkpoint_shards). Writes go to a temporary
sibling directory that is renamed into place, so a crash never leaves a half-written model.
Loading checks every tensor name and shape and reports all problems at once, then reads one
tensor at a time straight onto its device and dtype, into a model built on the meta device:
no second copy of the model (and no fp32 copy of a bf16 one) is ever held.

Imports point one way: this module builds on the model (`load_model` constructs one);
`HybridLM.save_pretrained` / `from_pretrained` are thin wrappers that import it only when
called, so importing the model loads no IO code and no module imports the other back.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from itertools import chain
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from hybridlm.checkpoint_shards import (
    DEFAULT_MAX_SHARD_SIZE,
    INDEX_NAME,
    WEIGHTS_NAME,
    CheckpointError,
    index_json,
    is_weight_file,
    parse_size,
    plan_shards,
    shard_name,
    weight_files,
)
from hybridlm.config import ModelConfig
from hybridlm.config_check import ConfigError
from hybridlm.config_legacy import upgrade
from hybridlm.model import HybridLM
from hybridlm.outputs import entries, link_or_copy, staged_dir

__all__ = ["CONFIG_NAME", "INDEX_NAME", "MODEL_TYPE", "WEIGHTS_NAME", "CheckpointError",
           "check_weights", "config_json", "load_config", "load_model", "load_weights",
           "save_model"]

CONFIG_NAME = "config.json"
# config.json names its kind the way HF transformers' AutoConfig reads it, so hybridlm.hf can
# open a model directory as-is; a directory written before this key existed loads the same.
MODEL_TYPE = "hybridlm"
# name -> (file, shape): where each tensor of a model directory is, read from headers only
Layout = dict[str, tuple[Path, tuple[int, ...]]]


def _tensors_to_save(model: HybridLM) -> dict[str, torch.Tensor]:
    """The saved tensors (parameters and persistent buffers), detached, where they are."""
    state = model.state_dict()
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # the same storage as embed_tokens.weight
    return {name: t.detach() for name, t in state.items()}


# ---------------------------------------------------------------------- writing
def save_model(model: HybridLM, directory: str | Path,
               max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE) -> None:
    """Write config.json + the weights into a new directory that then replaces `directory`
    (hybridlm.outputs.staged_dir): one model.safetensors when they fit in `max_shard_size`
    (bytes, or a string like "5GB", "500MB"), else shards + model.safetensors.index.json.
    Other files of an existing directory (tokenizer.json, trainer state) are kept: hard-linked
    (or copied) into the new one, never moved out of the old one, which is deleted only once
    the new one is in place. The old weights, of either layout, are not kept: shards of an
    earlier save must never be read as part of this one."""
    max_bytes = parse_size(max_shard_size)  # refused before anything is written
    directory = Path(directory)
    tensors = _tensors_to_save(model)
    sizes = {name: t.numel() * t.element_size() for name, t in tensors.items()}
    shards = plan_shards(sizes, max_bytes)
    with staged_dir(directory, replace=True, last=(INDEX_NAME, CONFIG_NAME)) as staging:
        if len(shards) == 1:
            _save_shard(tensors, shards[0], staging / WEIGHTS_NAME)
        else:
            weight_map = {}
            for i, names in enumerate(shards):
                _save_shard(tensors, names, staging / shard_name(i, len(shards)))
                weight_map.update(dict.fromkeys(names, shard_name(i, len(shards))))
            (staging / INDEX_NAME).write_text(index_json(weight_map, sum(sizes.values())))
        (staging / CONFIG_NAME).write_text(config_json(model.config) + "\n")
        if staging.parent != directory and directory.is_dir():
            for name, extra in entries(directory).items():
                if name != CONFIG_NAME and not is_weight_file(name):
                    link_or_copy(extra, staging / name)


def _save_shard(tensors: dict[str, torch.Tensor], names: list[str], path: Path) -> None:
    # Only this shard's tensors are copied to the host: a GPU model is never copied whole.
    save_file({name: tensors[name].contiguous().cpu() for name in names}, str(path),
              metadata={"format": "pt"})


def config_json(config: ModelConfig) -> str:
    """The text of a model directory's config.json: the config's fields + `model_type`."""
    return json.dumps({"model_type": MODEL_TYPE, **config.to_dict()}, indent=2, sort_keys=True)


# ---------------------------------------------------------------------- reading
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
    if isinstance(data, dict) and "model_type" in data:
        kind = data.pop("model_type")
        if kind != MODEL_TYPE:
            raise CheckpointError(f"{path}: model_type={kind!r} is not a hybridlm model; "
                                  f"allowed: {MODEL_TYPE!r} (or no model_type)")
    try:
        return ModelConfig.from_dict(upgrade(data))  # every field checked by type and range
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


def read_layout(directory: str | Path) -> Layout:
    """Where every tensor of a model directory is, and its shape, from the files' headers
    (checked against each file's size, so a truncated file fails here) without reading a
    tensor. Raises CheckpointError for missing or damaged files and for an index that names
    a tensor its shard does not hold."""
    directory = Path(directory)
    sources = weight_files(directory)  # {} for a single model.safetensors
    files = sorted(set(sources.values())) if sources else [directory / WEIGHTS_NAME]
    layout: Layout = {}
    not_held: dict[str, list[str]] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as opened:
                held = set(opened.keys())
                wanted = held if not sources else {n for n, f in sources.items() if f == file}
                for name in sorted(wanted & held):
                    layout[name] = (file, tuple(opened.get_slice(name).get_shape()))
        except (SafetensorError, OSError, ValueError) as err:
            raise CheckpointError(f"{file} is damaged or unreadable: {err}") from err
        if wanted - held:
            not_held[file.name] = sorted(wanted - held)
    if not_held:
        raise CheckpointError(f"{directory / INDEX_NAME} names tensors that its shards do not "
                              f"hold: {not_held}")
    return layout


def _weights_label(directory: Path) -> Path:
    return directory / (INDEX_NAME if (directory / INDEX_NAME).is_file() else WEIGHTS_NAME)


def _check_shapes(weights: Path, layout: Layout, model: HybridLM) -> None:
    """Every tensor name and shape of the checkpoint against the model's, all problems at
    once. `weights`: the file named in the message (model.safetensors or the index)."""
    found = {name: shape for name, (_, shape) in layout.items()}
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


def _read_tensors(layout: Layout, device: torch.device) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor on `device` in the file's dtype), one at a time. Each tensor opens its
    file anew: safetensors maps the whole file, and pages read through a long-lived mapping
    stay resident (counted in the process's memory) until it closes, so reading a shard through
    one mapping would hold up to a whole shard besides the model."""
    for name, (file, _) in layout.items():
        try:
            with safe_open(str(file), framework="pt", device=str(device)) as opened:
                tensor = opened.get_tensor(name)
        except (SafetensorError, OSError, ValueError) as err:
            raise CheckpointError(f"{file} is damaged or unreadable: {err}") from err
        yield name, tensor


def check_weights(model: HybridLM, directory: str | Path) -> None:
    """What `load_weights` would refuse (a missing, damaged or truncated file; names or shapes
    that do not match the model), found from the files' headers without reading a tensor: a
    resume checks its checkpoint this way before it writes anything."""
    _check_shapes(_weights_label(Path(directory)), read_layout(directory), model)


def load_weights(model: HybridLM, directory: str | Path) -> None:
    """Load the weights of `directory` (either layout) into an existing model, in place and
    in the model's dtypes, checking every name and shape first and reporting all problems at
    once."""
    layout = read_layout(directory)
    _check_shapes(_weights_label(Path(directory)), layout, model)
    targets = _tensors_to_save(model)
    device = next(model.parameters()).device
    with torch.no_grad():
        for name, tensor in _read_tensors(layout, device):
            targets[name].copy_(tensor)


def _floating_dtype(dtype: torch.dtype | None) -> torch.dtype | None:
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype={dtype!r} is not a floating torch dtype: give e.g. "
                         "torch.float32, torch.bfloat16, torch.float16, or None (as built)")
    return dtype


def load_model(
    cls: type[HybridLM], directory: str | Path, device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> HybridLM:
    """`cls` (HybridLM or a subclass) built from `directory/config.json` with its weights, on
    `device`; floating parameters in `dtype` (None: as the model builds them, fp32), except
    those a layer keeps in fp32 (its `fp32_parameters`: Mamba's A_log, D, dt_proj and conv1d,
    the routers' gates, as mixed-precision training keeps them); buffers (routing tables,
    selection biases) as built. The model is built on the meta device (no memory), each
    tensor is read onto `device`, cast, and put in place (assign), so host memory holds the
    model once in its final dtype plus one tensor. Buffers that are not saved are computed
    as a new layer computes them (`derived_buffers`), in the dtype the layer gives them."""
    dtype, device = _floating_dtype(dtype), torch.device(device)
    config = load_config(directory)
    layout = read_layout(directory)
    with torch.device("meta"):
        model = cls(config)
    _check_shapes(_weights_label(Path(directory)), layout, model)
    built = _tensors_to_save(model)  # meta tensors: the dtype each one is built in
    cast = set() if dtype is None else _low_precision_parameters(model)
    aliases = _aliases(model)
    state = {}
    for name, tensor in _read_tensors(layout, device):
        want = dtype if name in cast else built[name].dtype
        # copy=True even where the dtype is already right: on the CPU safetensors hands out
        # tensors backed by the file's mapping, and a model must not change (or crash) when
        # its file is later rewritten in place. The file-backed tensor goes now.
        state[name] = tensor.to(want, copy=True)
        del tensor
    # assign puts new Parameter objects in place: the marks layers set on theirs (Mamba's
    # A_log and D `_no_weight_decay`, read by the optimizer) are carried over by hand.
    marks = {name: dict(p.__dict__) for name, p in model.named_parameters() if p.__dict__}
    model.load_state_dict(state, strict=False, assign=True)
    del state
    for name, attributes in marks.items():
        model.get_parameter(name).__dict__.update(attributes)
    for alias, canonical in aliases.items():  # tied weights: one tensor under two names
        owner, _, leaf = alias.rpartition(".")
        setattr(model.get_submodule(owner), leaf, model.get_parameter(canonical))
    _put_derived_buffers(model, device)
    left = [name for name, t in chain(model.named_parameters(), model.named_buffers())
            if t.is_meta]
    if left:  # a layer gained a buffer that is neither saved nor in derived_buffers
        raise CheckpointError(f"{directory}: loading left {left} unset: neither saved nor "
                              "given by their layer's derived_buffers()")
    return model


def _low_precision_parameters(model: HybridLM) -> set[str]:
    """Names of the parameters a low-precision load casts: all but those listed, by name or
    by child module, in a layer's `fp32_parameters`."""
    kept = set()
    for prefix, module in model.named_modules():
        for entry in getattr(module, "fp32_parameters", ()):
            full = f"{prefix}.{entry}" if prefix else entry
            child = getattr(module, entry)
            if isinstance(child, torch.nn.Module):
                kept |= {f"{full}.{name}" for name, _ in child.named_parameters()}
            else:
                kept.add(full)
    return {name for name, _ in model.named_parameters()} - kept


def _aliases(model: HybridLM) -> dict[str, str]:
    """Parameter names that share a tensor with an earlier name (tied embeddings): alias ->
    the name under which the tensor is saved."""
    first: dict[int, str] = {}
    aliases = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in first:
            aliases[name] = first[id(param)]
        else:
            first[id(param)] = name
    return aliases


def _put_derived_buffers(model: HybridLM, device: torch.device) -> None:
    """Buffers that checkpoints do not carry (RoPE inv_freq, MoE load counts), still on the
    meta device: computed by their layer on `device`."""
    saved = set(model.state_dict())
    for name, buffer in list(model.named_buffers()):
        if name in saved or not buffer.is_meta:
            continue
        owner_name, _, leaf = name.rpartition(".")
        owner = model.get_submodule(owner_name)
        if hasattr(owner, "derived_buffers"):
            setattr(owner, leaf, owner.derived_buffers(device)[leaf])
