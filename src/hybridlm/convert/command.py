"""`hybridlm convert --from-hf DIR --out DIR` and `--to-hf DIR --out DIR`.

Both check --out before any work (hybridlm.outputs: a new or empty directory, or a model
directory replaced only with --overwrite), build the whole output beside it and move it into
place, so a failure leaves --out as it was. transformers loads and saves the HF side (any
layout it reads: sharded files, older tensor names), always from local files.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from hybridlm.checkpoint import WEIGHTS_NAME, load_config, save_model
from hybridlm.convert.common import ConvertError, require_transformers
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


def _stored_dtype(directory: Path) -> torch.dtype:
    """The dtype a hybridlm model directory stores its weights in (read off the embedding:
    from_pretrained builds the model in fp32 whatever the file holds)."""
    with safe_open(str(directory / WEIGHTS_NAME), framework="pt") as file:
        return file.get_tensor("embed_tokens.weight").dtype


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
    model = HybridLM(config)
    model.load_state_dict(state, strict=True)
    model.to(dtype)
    with staged_dir(out, replace=True) as staging:
        save_model(model, staging)
        tokenizer = tokenizer_from_hf(src, staging)
    return (f"{family.name} ({hf_config.model_type}) -> {out}: {config.num_hidden_layers} layers,"
            f" mixer_pattern={config.mixer_pattern!r}, mlp_pattern={config.mlp_pattern!r}, "
            f"{dtype}; {tokenizer or 'no tokenizer in ' + str(src)}")


def convert_to_hf(src: str | Path, out: str | Path, *, overwrite: bool = False) -> str:
    """hybridlm model directory `src` -> HF checkpoint directory `out`; returns a summary."""
    transformers = require_transformers()
    src = _source_dir(src, "--to-hf")
    out = claim_output(out, MODEL, overwrite=overwrite, inputs={"--to-hf": src})
    config = load_config(src)
    family = family_for_config(config)  # refuses layers with no HF counterpart
    model = HybridLM.from_pretrained(src)  # fp32 whatever was stored
    dtype = _stored_dtype(src)
    with staged_dir(out, replace=True) as staging:
        token_ids = tokenizer_to_hf(src, staging, config.max_position_embeddings)
        hf_config = family.config_to_hf(config, token_ids)
        hf_config.dtype = dtype
        state = family.weights_to_hf(model.state_dict(), config)
        del model
        with torch.device("meta"):  # no weights are allocated until the state is assigned
            hf_model = transformers.AutoModelForCausalLM.from_config(hf_config)
        missing, unexpected = hf_model.load_state_dict(state, strict=False, assign=True)
        if missing or unexpected:
            raise ConvertError(f"{family.name} does not take this model's tensors: missing "
                               f"{sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
        hf_model.to(dtype).save_pretrained(str(staging))
    return (f"{src} -> {family.name} ({hf_config.model_type}) {out}; "
            f"{'with' if token_ids else 'no'} tokenizer")
