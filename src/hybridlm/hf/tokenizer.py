"""`HybridLMTokenizerFast`: a hybridlm tokenizer.json as HF's `PreTrainedTokenizerFast`, with
`<|endoftext|>` as its eos (and padding) token and the directory's chat template.

The chat template is hybridlm's (`hybridlm.chat.ChatTemplate`, chat_template.json or the
default) written as the Jinja template HF's `apply_chat_template` runs: each turn is its role
marker and content, system and user turns end with `turn_end`, assistant turns with
`<|endoftext|>`, and `add_generation_prompt` appends the assistant marker: the text that
`hybridlm generate --chat` renders (`ChatTemplate.render_prompt`), character for character.
A directory that has its own chat_template.jinja (HF's file) keeps it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

from transformers import PreTrainedTokenizerFast

from hybridlm.chat import ChatTemplate
from hybridlm.data.tokenizer import EOS_TOKEN, EOS_TOKEN_ID, TOKENIZER_FILENAME, Tokenizer

HF_CHAT_TEMPLATE_FILE = "chat_template.jinja"


def _literal(text: str) -> str:
    """`text` as a Jinja string literal (Jinja reads JSON's escapes; non-ASCII stays as is)."""
    return json.dumps(text, ensure_ascii=False)


def end_of_text(directory: str | Path) -> tuple[str, int]:
    """The end-of-text token and id of a model directory, as hybridlm reads them
    (`<|endoftext|>`, 0, unless tokenizer_config.json names a converted tokenizer's own);
    hybridlm's when the directory has no tokenizer.json."""
    if not (Path(directory) / TOKENIZER_FILENAME).is_file():
        return EOS_TOKEN, EOS_TOKEN_ID
    tokenizer = Tokenizer.from_file(directory)
    return tokenizer.eos_token, tokenizer.eos_token_id


def jinja_chat_template(template: ChatTemplate, eos_token: str = EOS_TOKEN) -> str:
    """hybridlm's chat template as the Jinja source HF's `apply_chat_template` renders."""
    markers = "{" + ", ".join(
        f"{_literal(role)}: {_literal(getattr(template, role))}"
        for role in ("system", "user", "assistant")) + "}"
    return (
        "{%- set markers = " + markers + " -%}"
        "{%- for message in messages -%}"
        "{%- if message['role'] not in markers -%}"
        "{{ raise_exception('unknown role ' ~ message['role'] ~ '; allowed: system, user, "
        "assistant') }}"
        "{%- endif -%}"
        "{{ markers[message['role']] }}{{ message['content'] }}"
        "{%- if message['role'] == 'assistant' -%}{{ " + _literal(eos_token) + " }}"
        "{%- else -%}{{ " + _literal(template.turn_end) + " }}{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ markers['assistant'] }}{%- endif -%}"
    )


class HybridLMTokenizerFast(PreTrainedTokenizerFast):
    vocab_files_names: ClassVar[dict[str, str]] = {"tokenizer_file": TOKENIZER_FILENAME}
    model_input_names: ClassVar[list[str]] = ["input_ids", "attention_mask"]
    padding_side = "left"  # decoder-only: generate continues after each row's last token

    # No __init__ of its own: HF then loads tokenizer.json whole (pre-tokenizer, decoder and
    # all) instead of rebuilding it from the vocabulary as model-specific tokenizers do.

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, *args: Any,
                        **kwargs: Any) -> HybridLMTokenizerFast:
        eos_token, _ = end_of_text(pretrained_model_name_or_path)
        kwargs.setdefault("eos_token", eos_token)
        kwargs.setdefault("pad_token", eos_token)  # padding is masked out; any id will do
        kwargs["clean_up_tokenization_spaces"] = False  # decode exactly, as hybridlm does
        tokenizer = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        directory = Path(pretrained_model_name_or_path)
        if directory.is_dir() and not (directory / HF_CHAT_TEMPLATE_FILE).exists() and (
                tokenizer.chat_template is None):
            tokenizer.chat_template = jinja_chat_template(ChatTemplate.load(directory),
                                                          eos_token)
        return tokenizer
