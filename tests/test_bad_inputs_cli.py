"""Bad input to every command ends in one line on stderr that names the problem, never a
traceback, and leaves every directory the command reads (and a --out it refused) as it was.

Each case builds what it needs from a few pristine fixtures (a model directory, prepared data,
a trained run), usually a copy with one file damaged, and runs the real `hybridlm` entry point.
"""

from __future__ import annotations

import dataclasses
import io
import json
import lzma
import math
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

import cli_errors
from cli_errors import assert_one_line_error, run_cli
from hybridlm import HybridLM, ModelConfig
from hybridlm.checkpoint import load_config
from hybridlm.data import Document, Tokenizer, prepare_dataset
from hybridlm.train import TrainConfig, train

RUN_MODEL = {"hidden_size": 32, "num_hidden_layers": 1, "intermediate_size": 64,
             "max_position_embeddings": 64}


def tiny_model(vocab_size: int) -> HybridLM:
    torch.manual_seed(0)
    return HybridLM(ModelConfig(
        vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=64, num_experts=4, max_position_embeddings=64))


@dataclass
class World:
    """Pristine inputs, built once for the module; cases copy what they damage."""

    model: Path  # a model directory: config.json, model.safetensors, tokenizer.json
    data: Path  # prepared data
    run: Path  # a finished one-step training run (with a checkpoint)
    corpus: Path  # a small .jsonl corpus
    chats: Path  # SFT records


@pytest.fixture(scope="module")
def world(tmp_path_factory, small_tokenizer, prepared_dir, demo_docs) -> World:
    root = tmp_path_factory.mktemp("world")
    model = root / "model"
    tiny_model(small_tokenizer.vocab_size).save_pretrained(model)
    small_tokenizer.save(model)
    run = root / "run"
    train(TrainConfig(data=str(prepared_dir), out=str(run), model=dict(RUN_MODEL), steps=1,
                      global_batch_size=2, seq_len=16, eval_batches=1, progress=False))
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": d.id, "text": d.text[:1000]}) + "\n"
                              for d in demo_docs[:20]))
    chats = root / "chats.jsonl"
    chats.write_text("".join(json.dumps({"prompt": f"Say {i}.", "response": f"{i}."}) + "\n"
                             for i in range(8)))
    return World(model, prepared_dir, run, corpus, chats)


@pytest.fixture(autouse=True)
def no_progress_bars(monkeypatch):
    """Progress bars share stderr with the error; the one error line is what is checked."""
    from tqdm.auto import tqdm

    import hybridlm.data.prepare

    def quiet(*args, **kwargs):
        return tqdm(*args, **{**kwargs, "disable": True})

    monkeypatch.setattr(hybridlm.data.prepare, "tqdm", quiet)


# ---------------------------------------------------------------------- building bad inputs
def copy_of(src: Path, tmp: Path, name: str | None = None) -> Path:
    dst = tmp / (name or src.name)
    shutil.copytree(src, dst)
    return dst


def damaged(src: Path, tmp: Path, relpath: str,
            content: bytes | str | Callable[[bytes], bytes] | None) -> Path:
    """A copy of directory `src` whose file `relpath` holds `content` (bytes, text, or a
    function of the old bytes); None turns the file into an empty directory."""
    dst = copy_of(src, tmp)
    target = dst / relpath
    if content is None:
        target.unlink()
        target.mkdir()
    elif callable(content):
        target.write_bytes(content(target.read_bytes()))
    else:
        target.write_bytes(content.encode() if isinstance(content, str) else content)
    return dst


def half(data: bytes) -> bytes:
    return data[: len(data) // 2]


def write(tmp: Path, name: str, content: bytes | str) -> Path:
    path = tmp / name
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return path


BINARY = bytes(range(256)) * 4  # not UTF-8
TRUNCATED_XZ = lzma.compress(("".join(json.dumps({"text": f"document {i} " * 50}) + "\n"
                                      for i in range(200))).encode())[:300]


def edit_json(change: Callable[[dict], object]) -> Callable[[bytes], bytes]:
    def apply(data: bytes) -> bytes:
        obj = json.loads(data)
        change(obj)
        return json.dumps(obj).encode()
    return apply


# ---------------------------------------------------------------------- the cases
@dataclass
class Case:
    """`setup(world, tmp)` makes the inputs and returns (argv, paths that must not change:
    every directory the command reads, and a --out it must not create); the error line must
    hold every one of `words`."""

    setup: Callable[[World, Path], tuple[list, list]]
    words: tuple[str, ...]
    marks: tuple = ()


CASES: dict[str, Case] = {}


def bad_input(name: str, *words: str, marks: tuple = ()) -> Callable:
    def register(setup: Callable[[World, Path], tuple[list, list]]) -> Callable:
        CASES[name] = Case(setup, words, marks)
        return setup
    return register


NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
TRAIN = ["--batch-size", "2", "--seq-len", "16", "--steps", "1"]


def tokenizer_train(t: Path, corpus: Path, *more) -> tuple[list, list]:
    return ["tokenizer", "train", "--input", corpus, *more, "--out", t / "tok"], [t / "tok"]


def data_prepare(t: Path, corpus: Path, tokenizer: Path, *more) -> list:
    return ["data", "prepare", "--input", corpus, "--tokenizer", tokenizer, "--workers", "1",
            *more, "--out", t / "data"]


def train_on(data: Path, t: Path, *more) -> list:
    return ["train", "--data", data, "--out", t / "run", *TRAIN, *more]


def sft_args(model: Path, data: Path, t: Path, *more) -> list:
    return ["sft", "--model", model, "--data", data, "--out", t / "out", *TRAIN, *more]


def generate_args(model: Path, *more) -> list:
    return ["generate", "--model", model, "--prompt", "The Union", "--max-new-tokens", "3",
            *more]


def resume_args(w: World, run: Path) -> list:
    """Resume a copy of the world's run (its own run file, a new length)."""
    return ["train", "--config", w.run / "train_config.json", "--out", run, "--resume",
            "--steps", "2", "--reschedule"]


def torch_bytes(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


# --- tokenizer train ---------------------------------------------------------------------------
@bad_input("tokenizer train: truncated .jsonl.xz", "corpus.jsonl.xz", "is truncated")
def _(w, t):
    return tokenizer_train(t, write(t, "corpus.jsonl.xz", TRUNCATED_XZ))


@bad_input("tokenizer train: a .jsonl.xz that is not xz", "corpus.jsonl.xz", "not a valid xz")
def _(w, t):
    return tokenizer_train(t, write(t, "corpus.jsonl.xz", "{}\n"))


@bad_input("tokenizer train: a line that is not JSON", "c.jsonl:2", "invalid JSON")
def _(w, t):
    return tokenizer_train(t, write(t, "c.jsonl", '{"text": "a"}\nnope\n'))


@bad_input("tokenizer train: a line without text", "c.jsonl:1", "without 'text'", "title")
def _(w, t):
    return tokenizer_train(t, write(t, "c.jsonl", '{"title": "a"}\n'))


@bad_input("tokenizer train: text that is not a string", "c.jsonl:1", "'text' of type int")
def _(w, t):
    return tokenizer_train(t, write(t, "c.jsonl", '{"text": 5}\n'))


@bad_input("tokenizer train: a lone surrogate escape in a text", "c.jsonl:2",
           "lone surrogate \\ud800")
def _(w, t):  # valid JSON, but no tokenizer takes it (an escaped emoji pair is fine: line 1)
    return tokenizer_train(t, write(t, "c.jsonl", '{"text": "\\ud83d\\ude00"}\n'
                                                  '{"text": "a \\ud800 b"}\n'))


@bad_input("tokenizer train: an empty input", "empty.jsonl", "no non-empty documents")
def _(w, t):
    return tokenizer_train(t, write(t, "empty.jsonl", ""))


@bad_input("tokenizer train: a binary file as .txt", "blob.txt", "not UTF-8 text")
def _(w, t):
    return tokenizer_train(t, write(t, "blob.txt", BINARY))


@bad_input("tokenizer train: a directory holding a binary .txt", "blob.txt", "not UTF-8")
def _(w, t):
    (t / "corpus").mkdir()
    return tokenizer_train(t, write(t / "corpus", "blob.txt", BINARY).parent)


@bad_input("tokenizer train: --vocab-size 10 (before the corpus is read)", "vocab_size",
           ">= 258", "got 10")
def _(w, t):  # the binary input would be the error if the corpus were read first
    return tokenizer_train(t, write(t, "blob.txt", BINARY), "--vocab-size", "10")


@bad_input("tokenizer train: --vocab-size 10**11 (the trainer would abort out of memory)",
           "vocab_size", "at most 1048576", "got 100000000000")
def _(w, t):
    return tokenizer_train(t, w.corpus, "--vocab-size", str(10**11))


# --- data prepare ------------------------------------------------------------------------------
# (A --out that a failed preparation leaves as it was belongs to the output policy's tests.)
@bad_input("data prepare: a model dir whose tokenizer.json is truncated", "tokenizer.json",
           "not a readable tokenizer file")
def _(w, t):
    model = damaged(w.model, t, "tokenizer.json", half)
    return data_prepare(t, w.corpus, model), [model, t / "data"]


@bad_input("data prepare: a tokenizer.json that is not JSON", "tokenizer.json",
           "not a readable tokenizer file")
def _(w, t):
    return data_prepare(t, w.corpus, write(t, "tokenizer.json", "hello")), [t / "data"]


@bad_input("data prepare: a model's config.json as --tokenizer", "config.json",
           "not a readable tokenizer file")
def _(w, t):
    return data_prepare(t, w.corpus, w.model / "config.json"), [w.model, t / "data"]


@bad_input("data prepare: --workers 0", "workers", "got 0")
def _(w, t):
    return data_prepare(t, w.corpus, w.model, "--workers", "0"), [w.model, t / "data"]


@bad_input("data prepare: --shard-tokens 0", "shard_tokens", "got 0")
def _(w, t):
    return data_prepare(t, w.corpus, w.model, "--shard-tokens", "0"), [w.model, t / "data"]


@bad_input("data prepare: --val-fraction 1.5", "val_fraction", "[0, 1)", "1.5")
def _(w, t):
    return data_prepare(t, w.corpus, w.model, "--val-fraction", "1.5"), [w.model, t / "data"]


@bad_input("data prepare: --val-fraction nan", "val_fraction", "nan")
def _(w, t):
    return data_prepare(t, w.corpus, w.model, "--val-fraction", "nan"), [w.model, t / "data"]


@bad_input("data prepare: truncated .jsonl.xz", "corpus.jsonl.xz", "is truncated")
def _(w, t):
    corpus = write(t, "corpus.jsonl.xz", TRUNCATED_XZ)
    return data_prepare(t, corpus, w.model), [w.model]


@bad_input("data prepare: a line that is not JSON", "c.jsonl:2", "invalid JSON")
def _(w, t):
    corpus = write(t, "c.jsonl", '{"text": "a"}\n{\n')
    return data_prepare(t, corpus, w.model), [w.model]


@bad_input("data prepare: an empty input", "empty.jsonl", "no non-empty documents")
def _(w, t):
    return data_prepare(t, write(t, "empty.jsonl", "\n\n"), w.model), [w.model]


@bad_input("data prepare: a binary file as .txt", "blob.txt", "not UTF-8 text")
def _(w, t):
    return data_prepare(t, write(t, "blob.txt", BINARY), w.model), [w.model]


# --- train -------------------------------------------------------------------------------------
@bad_input("train: --device cuda without CUDA", "device='cuda'", "--device cpu",
           marks=(NO_CUDA,))
def _(w, t):
    return train_on(w.data, t, "--device", "cuda"), [w.data, t / "run"]


@bad_input("train: --device gpu7", "device='gpu7'", "auto, cpu, cuda, cuda:N or mps")
def _(w, t):
    return train_on(w.data, t, "--device", "gpu7"), [w.data, t / "run"]


@bad_input("train: --device meta", "device='meta'", "is not one of")
def _(w, t):
    return train_on(w.data, t, "--device", "meta"), [w.data, t / "run"]


@bad_input("train: --data a model directory", "model", "not a prepared data directory")
def _(w, t):
    return train_on(w.model, t), [w.model, t / "run"]


@bad_input("train: --data a corpus file", "corpus.jsonl", "is a file", "data prepare")
def _(w, t):
    return train_on(w.corpus, t), [t / "run"]


@bad_input("train: a damaged index.json", "train/index.json", "damaged", "not JSON")
def _(w, t):
    data = damaged(w.data, t, "train/index.json", half)
    return train_on(data, t), [data, t / "run"]


@bad_input("train: an index.json without shards", "train/index.json", "'shards'")
def _(w, t):
    data = damaged(w.data, t, "train/index.json", "{}")
    return train_on(data, t), [data, t / "run"]


@bad_input("train: a meta.json without dtype", "meta.json", "'dtype'", "None")
def _(w, t):
    data = damaged(w.data, t, "meta.json", edit_json(lambda meta: meta.pop("dtype")))
    return train_on(data, t), [data, t / "run"]


@bad_input("train: a meta.json whose splits is a string", "meta.json", "'splits'")
def _(w, t):
    data = damaged(w.data, t, "meta.json", edit_json(lambda meta: meta.update(splits="train")))
    return train_on(data, t), [data, t / "run"]


@bad_input("train: a damaged token_counts.npy", "token_counts.npy", "not a readable .npy")
def _(w, t):
    data = damaged(w.data, t, "token_counts.npy", "garbage")
    return train_on(data, t), [data, t / "run"]


@bad_input("train: token_counts.npy of the wrong length", "token_counts.npy",
           "integer counts (vocab_size)")
def _(w, t):
    counts = io.BytesIO()
    np.save(counts, np.zeros(3, dtype=np.int64))
    data = damaged(w.data, t, "token_counts.npy", counts.getvalue())
    return train_on(data, t), [data, t / "run"]


@bad_input("train: the data's tokenizer.json is truncated", "tokenizer.json",
           "not a readable tokenizer file")
def _(w, t):  # the run would copy it next to every model it saves
    data = damaged(w.data, t, "tokenizer.json", half)
    return train_on(data, t), [data, t / "run"]


@bad_input("train: a validation split shorter than one sequence (refused before the run)",
           "validation split", "has 3 tokens", "seq_len=16")
def _(w, t):
    prepare_dataset({"train": [Document("a", "word " * 500)], "validation": [Document("b", "hi")]},
                    Tokenizer.from_file(w.model), t / "data")
    return train_on(t / "data", t), [t / "data", t / "run"]


@bad_input("train: a run file that is not YAML (one line, however long YAML's message)",
           "run.yaml", "not valid YAML/JSON")
def _(w, t):
    config = write(t, "run.yaml", "steps: [1, 2\nlr: 3\n")
    return ["train", "--config", config, "--data", w.data, "--out", t / "run"], \
        [w.data, t / "run"]


@bad_input("train --resume: a damaged trainer_state.pt", "step_00000001/trainer_state.pt",
           "damaged or unreadable", "move step_00000001 aside")
def _(w, t):
    run = damaged(w.run, t, "checkpoints/step_00000001/trainer_state.pt", half)
    return resume_args(w, run), [run, w.data]


@bad_input("train --resume: a trainer_state.pt that is not a trainer state",
           "trainer_state.pt", "lacks ['rng', 'step']")
def _(w, t):
    run = damaged(w.run, t, "checkpoints/step_00000001/trainer_state.pt",
                  torch_bytes({"hello": 1}))
    return resume_args(w, run), [run, w.data]


@bad_input("train --resume: a truncated model.safetensors in the checkpoint",
           "step_00000001/model.safetensors", "damaged or unreadable")
def _(w, t):
    run = damaged(w.run, t, "checkpoints/step_00000001/model.safetensors", half)
    return resume_args(w, run), [run, w.data]


@bad_input("train --resume: a checkpoint of another model's shapes",
           "step_00000001/model.safetensors", "does not match config.json", "wrong shapes")
def _(w, t):
    run = copy_of(w.run, t)
    config = load_config(run / "checkpoints" / "step_00000001")
    HybridLM(dataclasses.replace(config, hidden_size=64)).save_pretrained(t / "other")
    shutil.copyfile(t / "other" / "model.safetensors",
                    run / "checkpoints" / "step_00000001" / "model.safetensors")
    return resume_args(w, run), [run, w.data]


@bad_input("train --resume: a metrics.jsonl line that is a list", "metrics.jsonl: line 1",
           "a JSON list")
def _(w, t):
    run = damaged(w.run, t, "metrics.jsonl", "[1, 2]\n{}\n")
    return resume_args(w, run), [run, w.data]


# --- sft ---------------------------------------------------------------------------------------
@bad_input("sft: --model whose tokenizer.json is truncated", "tokenizer.json",
           "not a readable tokenizer file")
def _(w, t):
    model = damaged(w.model, t, "tokenizer.json", half)
    return sft_args(model, w.chats, t), [model, t / "out"]


@bad_input("sft: a chat_template.json that is not JSON", "chat_template.json", "invalid JSON")
def _(w, t):
    model = damaged(w.model, t, "chat_template.json", "{oops")
    return sft_args(model, w.chats, t), [model, t / "out"]


@bad_input("sft: a --model that does not exist (not 'no tokenizer')", "model directory",
           "does not exist")
def _(w, t):
    return sft_args(t / "nothing", w.chats, t), [t / "out"]


@bad_input("sft: prepared data as --model", "config.json is missing",
           "not a hybridlm model directory")
def _(w, t):
    return sft_args(w.data, w.chats, t), [w.data, t / "out"]


@bad_input("sft: a line that is not JSON", "s.jsonl, line 2", "invalid JSON")
def _(w, t):
    records = write(t, "s.jsonl", '{"prompt": "a", "response": "b"}\nnope\n')
    return sft_args(w.model, records, t), [w.model, t / "out"]


@bad_input("sft: a record without response", "s.jsonl, line 1", "'response'")
def _(w, t):
    return sft_args(w.model, write(t, "s.jsonl", '{"prompt": "a"}\n'), t), [w.model, t / "out"]


@bad_input("sft: a message with an unknown role", "line 1", "unknown role 'bot'")
def _(w, t):
    records = write(t, "s.jsonl", json.dumps({"messages": [{"role": "bot", "content": "x"}]}))
    return sft_args(w.model, records, t), [w.model, t / "out"]


@bad_input("sft: a record that is a list", "line 1", "must be a JSON object, got list")
def _(w, t):
    return sft_args(w.model, write(t, "s.jsonl", "[1]\n"), t), [w.model, t / "out"]


@bad_input("sft: a lone surrogate escape in a record", "s.jsonl, line 1",
           "lone surrogate \\udfff")
def _(w, t):
    records = write(t, "s.jsonl", '{"prompt": "a \\uDFFF", "response": "b"}\n')
    return sft_args(w.model, records, t), [w.model, t / "out"]


@bad_input("sft: an empty data file", "empty.jsonl", "no records")
def _(w, t):
    return sft_args(w.model, write(t, "empty.jsonl", "\n"), t), [w.model, t / "out"]


@bad_input("sft: compressed data", "s.jsonl.xz", "not UTF-8", "compressed?")
def _(w, t):
    records = write(t, "s.jsonl.xz", lzma.compress(w.chats.read_bytes()))
    return sft_args(w.model, records, t), [w.model, t / "out"]


@bad_input("sft: every response beyond --seq-len", "packs into 0 rows",
           "8 of 8 examples have no response token within seq_len=16")
def _(w, t):
    records = write(t, "s.jsonl", "".join(json.dumps({"prompt": "word " * 40, "response": "ok"})
                                          + "\n" for _ in range(8)))
    return sft_args(w.model, records, t), [w.model, t / "out"]


@bad_input("sft: --data a directory", "is a directory", ".jsonl file")
def _(w, t):
    return sft_args(w.model, w.data, t), [w.model, w.data, t / "out"]


@bad_input("sft: --device gpu7", "device='gpu7'")
def _(w, t):
    return sft_args(w.model, w.chats, t, "--device", "gpu7"), [w.model, t / "out"]


# --- generate ----------------------------------------------------------------------------------
@bad_input("generate: a truncated tokenizer.json", "tokenizer.json",
           "not a readable tokenizer file")
def _(w, t):
    model = damaged(w.model, t, "tokenizer.json", half)
    return generate_args(model), [model]


@bad_input("generate: a tokenizer.json that is not JSON", "tokenizer.json",
           "not a readable tokenizer file")
def _(w, t):
    model = damaged(w.model, t, "tokenizer.json", "not json")
    return generate_args(model), [model]


@bad_input("generate: a binary tokenizer.json", "tokenizer.json", "not UTF-8 text")
def _(w, t):
    model = damaged(w.model, t, "tokenizer.json", BINARY)
    return generate_args(model), [model]


@bad_input("generate: a tokenizer with more tokens than the model", "vocab_size is 300",
           "not the one the model was trained with")
def _(w, t):  # what `tokenizer train --out MODEL_DIR` would leave behind
    model = copy_of(w.model, t)
    tiny_model(300).save_pretrained(model)
    return generate_args(model), [model]


@bad_input("generate --chat: a chat_template.json that is not JSON", "chat_template.json",
           "invalid JSON")
def _(w, t):
    model = damaged(w.model, t, "chat_template.json", "{")
    return generate_args(model, "--chat"), [model]


@bad_input("generate --chat: a chat_template.json that is a list", "chat_template.json",
           "must be a JSON object")
def _(w, t):
    model = damaged(w.model, t, "chat_template.json", "[1, 2]")
    return generate_args(model, "--chat"), [model]


@bad_input("generate --chat: a marker that is a number", "'user' must be a string")
def _(w, t):
    model = damaged(w.model, t, "chat_template.json", '{"user": 3}')
    return generate_args(model, "--chat"), [model]


@bad_input("generate --chat: a marker with a lone surrogate escape", "chat_template.json",
           "'assistant' holds a lone surrogate")
def _(w, t):
    model = damaged(w.model, t, "chat_template.json", '{"assistant": "\\ud800: "}')
    return generate_args(model, "--chat"), [model]


@bad_input("generate --chat: a chat_template.json that is a directory", "chat_template.json",
           "is not a file")
def _(w, t):
    model = copy_of(w.model, t)
    (model / "chat_template.json").mkdir()
    return generate_args(model, "--chat"), [model]


@bad_input("generate --chat: a binary chat_template.json", "chat_template.json", "not UTF-8")
def _(w, t):
    model = damaged(w.model, t, "chat_template.json", BINARY)
    return generate_args(model, "--chat"), [model]


for flag, value, words in [
    ("--temperature", "nan", ("temperature=nan", "finite number > 0")),
    ("--temperature", "inf", ("temperature=inf", "finite number > 0")),
    ("--temperature", "-1", ("temperature=-1.0", "> 0")),
    ("--top-p", "2", ("top_p=2.0", "(0, 1]")),
    ("--top-p", "nan", ("top_p=nan",)),
    ("--top-k", "0", ("top_k=0", ">= 1")),
    ("--max-new-tokens", "-3", ("max_new_tokens=-3", ">= 0")),
    ("--seed", "-1", ("--seed -1", "[0, 2**64)")),
]:
    bad_input(f"generate: {flag} {value}", *words)(
        lambda w, t, flag=flag, value=value: (generate_args(w.model, flag, value), [w.model]))


@bad_input("generate: a --prompt of bytes that are not UTF-8", "--prompt", "not UTF-8")
def _(w, t):  # how Python hands such bytes over in argv (surrogateescape)
    return ["generate", "--model", w.model, "--prompt", b"caf\xe9".decode("utf-8",
                                                                          "surrogateescape")], \
        [w.model]


@bad_input("generate: a run's checkpoints directory", "checkpoints/config.json is missing",
           "not a hybridlm model directory")
def _(w, t):
    return generate_args(w.run / "checkpoints"), [w.run]


@bad_input("generate: prepared data as --model", "not a hybridlm model directory")
def _(w, t):
    return generate_args(w.data), [w.data]


@bad_input("generate: weights that hold NaN", "logits are NaN", "weights hold NaN")
def _(w, t):
    model = copy_of(w.model, t)
    poisoned = HybridLM.from_pretrained(model)
    with torch.no_grad():
        poisoned.embed_tokens.weight.fill_(float("nan"))
    poisoned.save_pretrained(model)
    return generate_args(model), [model]


# --- plot --------------------------------------------------------------------------------------
def plot_with_metrics(content: bytes | str) -> Callable[[World, Path], tuple[list, list]]:
    def setup(w: World, t: Path) -> tuple[list, list]:
        run = damaged(w.run, t, "metrics.jsonl", content)
        return ["plot", run], [run]
    return setup


for title, content, words in [
    ("a line in the middle that is not JSON", '{"step": 1}\n{oops\n{"step": 2}\n',
     ("metrics.jsonl: line 2", "not valid JSON")),
    ("a line that is a list", "[1, 2]\n", ("metrics.jsonl: line 1", "a JSON list")),
    ("a binary metrics.jsonl", BINARY, ("metrics.jsonl", "not UTF-8 text")),
    ("an empty metrics.jsonl", "", ("holds no step records",)),
]:
    bad_input(f"plot: {title}", *words)(plot_with_metrics(content))


@bad_input("plot: no metrics.jsonl", "no metrics.jsonl")
def _(w, t):
    run = copy_of(w.run, t)
    (run / "metrics.jsonl").unlink()
    return ["plot", run], [run]


@bad_input("plot: a file as the run directory", "corpus.jsonl", "is a file")
def _(w, t):
    return ["plot", w.corpus], []


@bad_input("plot: a run directory that does not exist", "does not exist")
def _(w, t):
    return ["plot", t / "nothing"], [t / "nothing"]


# --- presets and demo --------------------------------------------------------------------------
@bad_input("presets: an extra argument", "unrecognized arguments: tiny")
def _(w, t):
    return ["presets", "tiny"], []



@pytest.mark.parametrize("name", [pytest.param(name, marks=c.marks, id=name)
                                  for name, c in CASES.items()])
def test_bad_input_is_one_line(name, world, tmp_path, capsys):
    argv, unchanged = CASES[name].setup(world, tmp_path)
    assert_one_line_error(argv, *CASES[name].words, capsys=capsys, unchanged=unchanged)


# ---------------------------------------------------------------------- unreadable, unwritable
def chmod_is_enforced(tmp: Path) -> bool:
    """False for root (os.geteuid() == 0) with its usual capabilities: chmod stops nobody."""
    probe = tmp / "probe"
    probe.mkdir()
    probe.chmod(0o555)
    try:
        (probe / "x").write_text("x")
        return False
    except PermissionError:
        return True
    finally:
        probe.chmod(0o755)
        shutil.rmtree(probe)


@pytest.fixture
def locked(tmp_path):
    """lock(path, mode) chmods a path until the test ends (then opens it again for cleanup)."""
    if not chmod_is_enforced(tmp_path):
        pytest.skip(f"permissions are not enforced for this user (euid {os.geteuid()})")
    done = []

    def lock(path: Path, mode: int) -> Path:
        path.chmod(mode)
        done.append(path)
        return path

    yield lock
    for path in done:
        path.chmod(0o755)


PERMISSION_CASES: dict[str, Case] = {}


def denied(name: str, *words: str) -> Callable:
    """Register a case whose setup(world, tmp, lock) locks a path with `lock(path, mode)`."""
    def register(setup: Callable) -> Callable:
        PERMISSION_CASES[name] = Case(setup, ("Permission denied", *words))
        return setup
    return register


@denied("tokenizer train: an unreadable input", "c.jsonl")
def _(w, t, lock):
    corpus = lock(write(t, "c.jsonl", '{"text": "a b"}\n'), 0)
    return tokenizer_train(t, corpus)


@denied("tokenizer train: --out in a read-only directory", "ro")
def _(w, t, lock):
    read_only = lock(t / "ro", 0o555)
    return ["tokenizer", "train", "--input", w.corpus, "--vocab-size", "300", "--out",
            read_only / "tok"], [read_only]


@denied("data prepare: --out in a read-only directory", "ro")
def _(w, t, lock):
    read_only = lock(t / "ro", 0o555)
    return ["data", "prepare", "--input", w.corpus, "--tokenizer", w.model, "--workers", "1",
            "--out", read_only / "data"], [read_only, w.model]


@denied("generate: an unreadable tokenizer.json", "tokenizer.json")
def _(w, t, lock):
    model = copy_of(w.model, t)
    lock(model / "tokenizer.json", 0)
    return generate_args(model), []  # no snapshot: the harness cannot read the file either


@denied("train: --out in a read-only directory", "ro")
def _(w, t, lock):
    read_only = lock(t / "ro", 0o555)
    return ["train", "--data", w.data, "--out", read_only / "run", *TRAIN], [read_only, w.data]


@denied("plot: a read-only run directory", "plots")
def _(w, t, lock):
    run = lock(copy_of(w.run, t), 0o555)
    return ["plot", run], [run]


@pytest.mark.parametrize("name", list(PERMISSION_CASES))
def test_permission_denied_is_one_line_naming_the_path(name, world, tmp_path, locked, capsys):
    (tmp_path / "ro").mkdir()
    argv, unchanged = PERMISSION_CASES[name].setup(world, tmp_path, locked)
    assert_one_line_error(argv, *PERMISSION_CASES[name].words, capsys=capsys,
                          unchanged=unchanged)


# ---------------------------------------------------------------------- other entry points
def test_python_m_hybridlm_train_reports_one_line(world, tmp_path, capsys, monkeypatch):
    from hybridlm.train.__main__ import main as train_main

    monkeypatch.setattr(cli_errors, "main", train_main)
    assert_one_line_error(["--data", world.data, "--out", tmp_path / "run", "--device", "gpu7",
                           *TRAIN], "hybridlm train: error", "device='gpu7'", capsys=capsys,
                          unchanged=[world.data, tmp_path / "run"])


@pytest.mark.parametrize("flags, words", [
    (["--steps", "0"], ["steps", "0"]),
    (["--vocab-size", "10"], ["vocab_size", "got 10"]),
    (["--max-minutes", "nan"], ["max_minutes", "nan"]),
])
def test_demo_refuses_bad_flags_before_reading_the_corpus(flags, words, tmp_path, capsys,
                                                         monkeypatch):
    """Preparing the demo data takes a minute; a bad flag must not wait for it (and makes
    nothing under --out)."""
    import hybridlm.demo

    def read_corpus(*args):
        raise AssertionError("the demo read its corpus before checking its flags")

    monkeypatch.setattr(hybridlm.demo, "load_documents", read_corpus)
    assert_one_line_error(["demo", "--out", tmp_path / "demo", *flags], *words, capsys=capsys,
                          unchanged=[tmp_path / "demo"])


def test_a_message_of_several_lines_is_reported_on_one(capsys, monkeypatch):
    import hybridlm.train.plots

    def fails(run_dir):
        raise ValueError("while parsing the file\n  in line 2:\n\nexpected a value")

    monkeypatch.setattr(hybridlm.train.plots, "plot_run", fails)
    line = assert_one_line_error(["plot", "anything"], capsys=capsys)
    assert line == ("hybridlm plot: error: while parsing the file; in line 2:; "
                    "expected a value")


def test_ctrl_c_is_one_line_and_exit_130(world, capsys, monkeypatch):
    import hybridlm.train.plots

    def interrupted(run_dir):
        raise KeyboardInterrupt

    monkeypatch.setattr(hybridlm.train.plots, "plot_run", interrupted)
    code, _, err = run_cli(["plot", world.run], capsys)
    assert code == 130 and err.strip() == "hybridlm plot: interrupted"


def test_a_closed_stdout_ends_quietly_with_141(capsys, monkeypatch):
    """`hybridlm presets | head -1`: the reader went away; no error line, no traceback."""
    import hybridlm.cli

    def print_into_closed_pipe(args):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(hybridlm.cli, "cmd_presets", print_into_closed_pipe)
    code, _, err = run_cli(["presets"], capsys)
    assert code == 141 and err == ""


def test_tokenizer_workers_leave_ctrl_c_to_the_command(world):
    """Ctrl-C reaches every process of the group: `data prepare`'s workers ignore it (the
    command stops the pool and says so in one line) instead of each printing a traceback."""
    import signal

    from hybridlm.data.prepare import _init_worker, _mp_context

    with _mp_context().Pool(1, initializer=_init_worker,
                            initargs=(str(world.model / "tokenizer.json"), "uint16")) as pool:
        assert pool.apply(signal.getsignal, (signal.SIGINT,)) == signal.SIG_IGN


def test_data_prepared_without_a_validation_split_trains(world, tmp_path, capsys):
    """--val-fraction 0 is allowed, so train must accept its empty validation split (it failed
    at the first evaluation) and report no held-out loss."""
    data = tmp_path / "data"
    code, _, err = run_cli(["data", "prepare", "--input", world.corpus, "--tokenizer",
                            world.model, "--workers", "1", "--val-fraction", "0", "--out", data],
                           capsys)
    assert code == 0, err
    assert json.loads((data / "meta.json").read_text())["tokens"]["validation"] == 0
    code, out, err = run_cli(train_on(data, tmp_path, "--set", "progress=false", "--set",
                                      "model.num_hidden_layers=1"), capsys)
    assert code == 0, err
    assert math.isnan(json.loads(out.splitlines()[-1])["val_loss"])


def test_a_tiny_temperature_samples_like_greedy(world, capsys):
    """1e-300 underflows float32: the sampler must not divide by zero (NaN probabilities)."""
    outputs = []
    for flags in (["--temperature", "1e-300"], ["--greedy"]):
        code, out, err = run_cli(generate_args(world.model, *flags), capsys)
        assert code == 0, err
        outputs.append(out)
    assert outputs[0] == outputs[1]
