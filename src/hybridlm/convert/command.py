"""`hybridlm convert --from-hf DIR --out DIR` and `--to-hf DIR --out DIR`.

Both check --out before any work (hybridlm.outputs: a new or empty directory, or a model
directory replaced only with --overwrite), build the whole output beside it and move it into
place, so a failure leaves --out as it was. transformers loads and saves the HF side (any
layout it reads: sharded files, older tensor names), always from local files.

Neither side is built with random weights first: the mapped tensors are checked, name by name
and shape by shape, against a model on the meta device (no memory) and written as they are,
in the checkpoint's dtype. Memory holds the checkpoint's tensors and those the mapping had to
copy (fused q/k/v, transposed experts), never a randomly initialised model besides.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from hybridlm.checkpoint import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    CheckpointError,
    config_json,
    load_config,
)
from hybridlm.config import ModelConfig
from hybridlm.convert.common import ConvertError, State, require_transformers
from hybridlm.convert.registry import family_for_config, family_for_model_type
from hybridlm.convert.tokenizer import tokenizer_from_hf, tokenizer_to_hf
from hybridlm.model import HybridLM
from hybridlm.outputs import MODEL, claim_output, staged_dir


def _source_dir(path: str | Path, flag: str) -> Path:
    path = Path(path)
    if not (path / "config.json").is_file():
        raise ConvertError(f"{flag} {path}: no config.json there (a local model directory is "
                           "needed; nothing is downloaded)")
    return path


def _check_state(config: ModelConfig, state: State, what: str) -> None:
    """Every tensor of `state` against a HybridLM of `config` built on the meta device (the
    names and shapes only), all problems at once."""
    with torch.device("meta"):
        expected = {name: tuple(t.shape) for name, t in HybridLM(config).state_dict().items()}
    found = {name: tuple(t.shape) for name, t in state.items()}
    if found != expected:
        wrong = sorted(f"{name}: {found[name]} vs {expected[name]}"
                       for name in set(found) & set(expected) if found[name] != expected[name])
        raise ConvertError(f"{what} does not match its config: missing "
                           f"{sorted(set(expected) - set(found))[:5]}, unexpected "
                           f"{sorted(set(found) - set(expected))[:5]}, wrong shapes {wrong[:5]}")


def convert_from_hf(src: str | Path, out: str | Path, *, overwrite: bool = False) -> str:
    """HF checkpoint directory `src` -> hybridlm model directory `out`; returns a summary."""
    transformers = require_transformers()
    src = _source_dir(src, "--from-hf")
    out = claim_output(out, MODEL, overwrite=overwrite, inputs={"--from-hf": src})
    hf_config = transformers.AutoConfig.from_pretrained(str(src), local_files_only=True)
    family = family_for_model_type(hf_config.model_type)
    config = family.config_from_hf(hf_config)  # refuses what hybridlm cannot represent
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(
        str(src), local_files_only=True, dtype="auto")
    dtype = next(hf_model.parameters()).dtype
    state = family.weights_from_hf(hf_model.state_dict(), config)
    del hf_model
    _check_state(config, state, f"the converted {family.name} checkpoint")
    if config.tie_word_embeddings:
        state.pop("lm_head.weight")  # the embedding itself, as hybridlm.checkpoint saves it
    with staged_dir(out, replace=True) as staging:
        (staging / CONFIG_NAME).write_text(config_json(config) + "\n")
        save_file({name: t.contiguous() for name, t in state.items()},
                  str(staging / WEIGHTS_NAME), metadata={"format": "pt"})
        tokenizer = tokenizer_from_hf(src, staging)
    return (f"{family.name} ({hf_config.model_type}) -> {out}: {config.num_hidden_layers} layers,"
            f" mixer_pattern={config.mixer_pattern!r}, mlp_pattern={config.mlp_pattern!r}, "
            f"{dtype}; {tokenizer or 'no tokenizer in ' + str(src)}")


def _stored_state(src: Path, config: ModelConfig) -> State:
    """The tensors of a hybridlm model directory as stored (their dtype kept), checked against
    its config; a tied lm_head is the embedding."""
    try:
        state = load_file(str(src / WEIGHTS_NAME))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{src / WEIGHTS_NAME} is damaged or unreadable: {err}") from err
    if config.tie_word_embeddings:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    _check_state(config, state, str(src / WEIGHTS_NAME))
    return state


def convert_to_hf(src: str | Path, out: str | Path, *, overwrite: bool = False) -> str:
    """hybridlm model directory `src` -> HF checkpoint directory `out`; returns a summary."""
    transformers = require_transformers()
    src = _source_dir(src, "--to-hf")
    out = claim_output(out, MODEL, overwrite=overwrite, inputs={"--to-hf": src})
    config = load_config(src)
    family = family_for_config(config)  # refuses layers with no HF counterpart
    state = _stored_state(src, config)
    dtype = state["embed_tokens.weight"].dtype
    with staged_dir(out, replace=True) as staging:
        token_ids = tokenizer_to_hf(src, staging, config.max_position_embeddings)
        hf_config = family.config_to_hf(config, token_ids)
        hf_config.dtype = dtype
        hf_state = family.weights_to_hf(state, config)
        del state
        with torch.device("meta"):  # no weights are allocated until the state is assigned
            hf_model = transformers.AutoModelForCausalLM.from_config(hf_config)
        missing, unexpected = hf_model.load_state_dict(hf_state, strict=False, assign=True)
        if missing or unexpected:
            raise ConvertError(f"{family.name} does not take this model's tensors: missing "
                               f"{sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
        hf_model.save_pretrained(str(staging))
    return (f"{src} -> {family.name} ({hf_config.model_type}) {out}; "
            f"{'with' if token_ids else 'no'} tokenizer")
