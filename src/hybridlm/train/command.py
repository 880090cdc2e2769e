"""The flags of `hybridlm train` and `hybridlm sft`, and what both run. `python -m
hybridlm.train` (what torchrun launches) uses them too, so the CLI imports this module and
training never imports the CLI."""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from hybridlm.train.config import load_train_config
from hybridlm.train.trainer import train

TRAIN_FLAGS = {  # flag -> (TrainConfig field, type); unset flags keep the config file's value
    "--data": ("data", str), "--out": ("out", str), "--preset": ("preset", str),
    "--steps": ("steps", int), "--batch-size": ("global_batch_size", int),
    "--micro-batch-size": ("micro_batch_size", int), "--seq-len": ("seq_len", int),
    "--lr": ("lr", float), "--warmup-steps": ("warmup_steps", int),
    "--schedule": ("schedule", str), "--eval-every": ("eval_every", int),
    "--eval-batches": ("eval_batches", int), "--checkpoint-every": ("checkpoint_every", int),
    "--max-minutes": ("max_minutes", float), "--seed": ("seed", int),
    "--device": ("device", str), "--parallel": ("parallel", str),
}


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML/JSON run file (TrainConfig fields; `model:` overrides)")
    for flag, (field, kind) in TRAIN_FLAGS.items():
        p.add_argument(flag, dest=field, type=kind, default=None)
    p.add_argument("--compile", action="store_true", default=None, help="torch.compile the model")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    p.add_argument("--reschedule", action="store_true",
                   help="with --resume: accept a new --steps, which changes the learning rate "
                        "of the remaining steps (the new schedule is printed)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a field; model.FIELD=VALUE overrides the model config")


def run_train_command(args: argparse.Namespace, **fixed: Any) -> None:
    """Train from the parsed flags (`fixed`: TrainConfig fields the command itself sets, over
    the config file's) and print the result as JSON (rank 0 only, under torchrun)."""
    overrides = {field: getattr(args, field) for field, _ in TRAIN_FLAGS.values()}
    overrides.update(compile=args.compile, **fixed)
    cfg = load_train_config(args.config, overrides, args.set)
    result = train(cfg, resume=args.resume, reschedule=args.reschedule)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(vars(result)))


def run_sft_command(args: argparse.Namespace) -> None:
    """`hybridlm sft --model DIR`: the train command with task='sft' from that model."""
    run_train_command(args, task="sft", init_from=args.model)
