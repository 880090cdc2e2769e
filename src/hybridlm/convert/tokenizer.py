"""Tokenizers both ways: HF's tokenizer.json is the format hybridlm's Tokenizer reads, so a
conversion copies it and names the special tokens in tokenizer_config.json (the file both
sides read: hybridlm takes eos_token from it, HF its tokenizer class and special tokens).

An HF directory with only a slow tokenizer (e.g. tokenizer.model) is converted to
tokenizer.json by transformers' AutoTokenizer first. An HF chat template (Jinja, in
chat_template.jinja or tokenizer_config.json) is carried along for HF's use both ways, but it
is not hybridlm's chat_template.json: `hybridlm generate --chat` does not read it, and the
summary says so.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from hybridlm.convert.common import ConvertError, require_transformers
from hybridlm.data.tokenizer import (
    EOS_TOKEN,
    TOKENIZER_CONFIG_FILENAME,
    TOKENIZER_FILENAME,
    Tokenizer,
)

SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token")
JINJA_TEMPLATE = "chat_template.jinja"  # where HF transformers writes a chat template


def _token_text(value: Any) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConvertError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise ConvertError(f"{path} must hold a JSON object")
    return data


def tokenizer_from_hf(src: Path, out: Path) -> str | None:
    """Write tokenizer.json + tokenizer_config.json of HF directory `src` into `out`; returns
    what was done, in words, or None when `src` has no tokenizer."""
    config_file = src / TOKENIZER_CONFIG_FILENAME
    config = _read_json(config_file) if config_file.is_file() else {}
    if (src / TOKENIZER_FILENAME).is_file():
        shutil.copyfile(src / TOKENIZER_FILENAME, out / TOKENIZER_FILENAME)
    elif any(src.glob("tokenizer.model")) or config:
        transformers = require_transformers()
        hf_tok = transformers.AutoTokenizer.from_pretrained(str(src), local_files_only=True)
        backend = getattr(hf_tok, "backend_tokenizer", None)
        if backend is None:
            raise ConvertError(f"{src}: its tokenizer has no tokenizer.json form (a slow "
                               "tokenizer transformers cannot convert)")
        backend.save(str(out / TOKENIZER_FILENAME))
        config = {name: getattr(hf_tok, name) for name in SPECIAL_TOKENS
                  if getattr(hf_tok, name, None) is not None} | config
    else:
        return None
    specials = {name: _token_text(config[name]) for name in SPECIAL_TOKENS
                if _token_text(config.get(name)) is not None}
    kept = {**{k: v for k, v in config.items() if k not in SPECIAL_TOKENS}, **specials}
    (out / TOKENIZER_CONFIG_FILENAME).write_text(json.dumps(kept, indent=2) + "\n")
    Tokenizer.from_file(out)  # hybridlm reads it: its eos token is in the vocabulary
    summary = f"tokenizer.json with eos_token={specials.get('eos_token', EOS_TOKEN)!r}"
    if (src / JINJA_TEMPLATE).is_file():
        shutil.copyfile(src / JINJA_TEMPLATE, out / JINJA_TEMPLATE)
    if (src / JINJA_TEMPLATE).is_file() or "chat_template" in kept:
        summary += ("; the HF chat template is kept for transformers, but hybridlm generate "
                    "--chat uses chat_template.json (hybridlm's default without one)")
    return summary


def tokenizer_to_hf(src: Path, out: Path, max_length: int | None) -> dict[str, int]:
    """Write tokenizer.json + tokenizer_config.json of hybridlm directory `src` into `out`;
    returns the HF config's special token ids (bos/eos/pad), empty without a tokenizer."""
    if not (src / TOKENIZER_FILENAME).is_file():
        return {}
    tokenizer = Tokenizer.from_file(src)
    config_file = src / TOKENIZER_CONFIG_FILENAME
    config = _read_json(config_file) if config_file.is_file() else {}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **config,
              "eos_token": tokenizer.eos_token}
    if max_length is not None:
        config.setdefault("model_max_length", max_length)
    shutil.copyfile(src / TOKENIZER_FILENAME, out / TOKENIZER_FILENAME)
    (out / TOKENIZER_CONFIG_FILENAME).write_text(json.dumps(config, indent=2) + "\n")
    if (src / JINJA_TEMPLATE).is_file():
        shutil.copyfile(src / JINJA_TEMPLATE, out / JINJA_TEMPLATE)
    ids = {"eos_token_id": tokenizer.eos_token_id}
    for name in ("bos_token", "pad_token"):
        token = _token_text(config.get(name))
        if token is not None and tokenizer.token_to_id(token) is not None:
            ids[f"{name}_id"] = tokenizer.token_to_id(token)
    return ids
