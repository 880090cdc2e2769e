"""Byte-level BPE tokenizer (GPT-2 style) backed by the Hugging Face ``tokenizers`` library.

Every byte sequence is representable (the 256 byte symbols are always in the vocabulary), so
``decode(encode(s)) == s`` holds exactly for any unicode string: leading or repeated spaces,
newlines, tabs, emoji and other scripts included. Id 0 is the end-of-text token
``<|endoftext|>``, appended after each document when a dataset is prepared.

A tokenizer converted from another model family (``hybridlm convert --from-hf``) keeps that
family's ids and names its own end-of-text token in ``tokenizer_config.json`` beside
``tokenizer.json`` (the ``eos_token`` field, as HF transformers writes it); ``from_file``
reads it, and ``eos_token_id`` is then that token's id.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from hybridlm.outputs import staged_file

EOS_TOKEN = "<|endoftext|>"
EOS_TOKEN_ID = 0
MIN_VOCAB_SIZE = 258  # 256 byte symbols + <|endoftext|> + at least one merge
# Far above any useful vocabulary; the trainer allocates for the requested size up front, so a
# mistyped 10**11 aborts the process (out of memory) instead of raising.
MAX_VOCAB_SIZE = 2**20
TOKENIZER_FILENAME = "tokenizer.json"
TOKENIZER_CONFIG_FILENAME = "tokenizer_config.json"  # optional: names another eos token


def check_vocab_size(vocab_size: int) -> None:
    """Raise ValueError unless ``vocab_size`` can hold the bytes, eos and a merge and is at
    most MAX_VOCAB_SIZE; callers check it before reading a corpus, not after."""
    if not isinstance(vocab_size, int) or isinstance(vocab_size, bool) \
            or vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(
            f"vocab_size must be an int >= {MIN_VOCAB_SIZE} (256 bytes + {EOS_TOKEN} + "
            f"at least one merge), got {vocab_size!r}"
        )
    if vocab_size > MAX_VOCAB_SIZE:  # the BPE trainer allocates for the whole vocabulary
        raise ValueError(f"vocab_size must be at most {MAX_VOCAB_SIZE} (2**20), got "
                         f"{vocab_size}")


class Tokenizer:
    """Byte-level BPE tokenizer with ``<|endoftext|>`` as id 0.

    Build one with :meth:`train` or :meth:`from_file`; the constructor wraps an existing
    ``tokenizers.Tokenizer`` and checks that it has the end-of-text token at id 0, or, when
    ``eos_token`` names another one (a converted tokenizer), that the vocabulary holds it.
    """

    def __init__(self, backend: _HFTokenizer, eos_token: str | None = None) -> None:
        if eos_token is None or eos_token == EOS_TOKEN:
            eos_id = backend.token_to_id(EOS_TOKEN)
            if eos_id != EOS_TOKEN_ID:
                raise ValueError(
                    f"tokenizer must map {EOS_TOKEN!r} to id {EOS_TOKEN_ID}, found id {eos_id}"
                )
            eos_token = EOS_TOKEN
        elif backend.token_to_id(eos_token) is None:
            raise ValueError(f"eos_token {eos_token!r} is not in the tokenizer's vocabulary")
        self._tok = backend
        self._eos_token = eos_token
        self._eos_id = backend.token_to_id(eos_token)

    # ------------------------------------------------------------------ construction
    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> Tokenizer:
        """Train a byte-level BPE tokenizer on ``texts``.

        Args:
            texts: training texts (any iterable of strings, e.g. document texts).
            vocab_size: target vocabulary size including the 256 byte symbols and
                ``<|endoftext|>``; the result can be smaller if the texts run out of merges.
            min_frequency: minimum pair count for a merge.

        Raises:
            ValueError: ``vocab_size`` outside [258, 2**20] or ``min_frequency`` < 1.
        """
        check_vocab_size(vocab_size)
        if not isinstance(min_frequency, int) or min_frequency < 1:
            raise ValueError(f"min_frequency must be an int >= 1, got {min_frequency!r}")
        backend = _HFTokenizer(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        backend.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=[EOS_TOKEN],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        backend.train_from_iterator(texts, trainer=trainer)
        return cls(backend)

    @classmethod
    def from_file(cls, path: str | Path) -> Tokenizer:
        """Load a tokenizer from a ``tokenizer.json`` file or a directory containing one.

        Raises:
            FileNotFoundError: no tokenizer file at ``path``.
            ValueError: the file is not a tokenizer (damaged, truncated, another format) or
                lacks ``<|endoftext|>`` at id 0.
        """
        path = Path(path)
        file = path / TOKENIZER_FILENAME if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {file}")
        damaged = f"{file} is not a readable tokenizer file: it is damaged or not a tokenizer.json"
        try:  # read here, so that an unreadable file is an OSError naming it
            text = file.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"{damaged} (not UTF-8 text)") from None
        try:
            backend = _HFTokenizer.from_str(text)
        except Exception as err:
            if type(err) is not Exception:  # only the bare Exception the tokenizers library
                raise  # raises for text it cannot parse
            raise ValueError(f"{damaged} ({err})") from None
        try:
            eos_token = _configured_eos(file.with_name(TOKENIZER_CONFIG_FILENAME))
            return cls(backend, eos_token=eos_token)
        except ValueError as err:
            raise ValueError(f"{file}: {err}") from None

    def save(self, path: str | Path) -> Path:
        """Write the tokenizer as JSON to ``path``: a ``*.json`` file, or else a directory
        (created if needed) that receives ``tokenizer.json`` (and, for an eos token other
        than ``<|endoftext|>``, ``tokenizer_config.json`` naming it). The file is written whole
        beside its place and then moved there, so an interrupted save leaves the old one.

        Returns the path of the written file.
        """
        path = Path(path)
        file = path if path.suffix == ".json" else path / TOKENIZER_FILENAME
        with staged_file(file) as staging:
            self._tok.save(str(staging))
        if self._eos_token != EOS_TOKEN:  # a converted tokenizer: name its eos beside it
            config_file = file.with_name(TOKENIZER_CONFIG_FILENAME)
            with staged_file(config_file) as staging:
                staging.write_text(json.dumps({"eos_token": self._eos_token}) + "\n")
        return file

    # ------------------------------------------------------------------ properties
    @property
    def vocab_size(self) -> int:
        """Number of token ids, special tokens included (ids are ``0 .. vocab_size - 1``)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def eos_token_id(self) -> int:
        """Id of the end-of-text token (0 for ``<|endoftext|>``, hybridlm's own)."""
        return self._eos_id

    @property
    def eos_token(self) -> str:
        return self._eos_token

    @property
    def backend(self) -> _HFTokenizer:
        """The wrapped ``tokenizers.Tokenizer``."""
        return self._tok

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, eos_token_id={self.eos_token_id})"

    # ------------------------------------------------------------------ encode / decode
    def encode(self, text: str) -> list[int]:
        """Encode one string to token ids (length ``T``); no end-of-text token is added."""
        return self._tok.encode(text).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Encode many strings in parallel; returns one id list per input string."""
        texts = list(texts)
        fast = getattr(self._tok, "encode_batch_fast", None)  # tokenizers >= 0.21, no offsets
        encodings = fast(texts) if fast is not None else self._tok.encode_batch(texts)
        return [enc.ids for enc in encodings]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Decode token ids back to text.

        With the default ``skip_special_tokens=False`` an end-of-text id decodes to the literal
        ``<|endoftext|>``, which keeps ``decode(encode(s)) == s`` exact for every string.
        """
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)


def tokenizer_files(tokenizer_file: str | Path) -> list[Path]:
    """What a copy of a tokenizer must take: its tokenizer.json and, where one lies beside it,
    the tokenizer_config.json that names its eos token (a converted tokenizer)."""
    tokenizer_file = Path(tokenizer_file)
    config_file = tokenizer_file.with_name(TOKENIZER_CONFIG_FILENAME)
    return [tokenizer_file, *([config_file] if config_file.is_file() else [])]


def _configured_eos(config_file: Path) -> str | None:
    """The eos token named by a tokenizer_config.json (a string, or HF's {"content": ...}),
    None when there is no such file or it names none."""
    if not config_file.is_file():
        return None
    try:
        data = json.loads(config_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{config_file} is not valid JSON: {err}") from None
    eos = data.get("eos_token") if isinstance(data, dict) else None
    if isinstance(eos, dict):
        eos = eos.get("content")
    if eos is not None and not isinstance(eos, str):
        raise ValueError(f"{config_file}: eos_token={eos!r} must be a string")
    return eos
