"""The training loop: AdamW, warmup + cosine, gradient clipping, held-out loss, checkpoint.

A run reads a prepared data directory (`hybridlm data prepare` / `hybridlm demo`), trains a
preset (with overrides), and writes a model directory that every other command loads:
config.json, model.safetensors, tokenizer.json, train_config.json, metrics.jsonl.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from hybridlm.config import ModelConfig
from hybridlm.data import BatchSampler, iter_eval_windows, load_prepared
from hybridlm.layers.routing_tables import zipf_routing_table
from hybridlm.model import HybridLM
from hybridlm.train.optim import build_optimizer
from hybridlm.train.schedule import warmup_cosine


@dataclass
class TrainConfig:
    data: str  # prepared data directory (train.bin, validation.bin, tokenizer.json, ...)
    out: str  # run directory; the final model is written here
    preset: str = "tiny"  # ModelConfig preset
    model_overrides: dict[str, Any] = field(default_factory=dict)  # ModelConfig field overrides
    steps: int = 300  # optimizer steps
    batch_size: int = 16  # windows per step
    seq_len: int = 256  # tokens per window
    lr: float = 1e-3  # peak learning rate
    min_lr_ratio: float = 0.1  # cosine floor, as a fraction of lr
    warmup_steps: int = 30
    weight_decay: float = 0.1
    grad_clip: float = 1.0  # max global gradient norm; <= 0 disables clipping
    eval_every: int = 100  # held-out loss every K steps (and at the end)
    eval_batches: int = 8  # batches of the validation split per evaluation
    max_minutes: float | None = None  # stop early (and still save) after this wall time
    seed: int = 0
    device: str = "auto"  # "auto" | "cpu" | "cuda" | "cuda:N"

    def validate(self) -> None:
        for name in ("steps", "batch_size", "seq_len", "eval_every", "eval_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if not self.lr > 0:
            raise ValueError(f"lr={self.lr} must be > 0")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps={self.warmup_steps} must be >= 0")


@dataclass
class TrainResult:
    steps: int
    train_loss: float
    val_loss: float
    seconds: float
    tokens_per_s: float
    out: str


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@torch.no_grad()
def evaluate(model: HybridLM, tokens, seq_len: int, batch_size: int, max_batches: int,
             device: torch.device) -> float:
    """Mean next-token loss (nats/token) over contiguous windows of a held-out split."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for window in iter_eval_windows(tokens, seq_len, batch_size, max_batches):
        window = window.to(device)
        n = window.shape[0] * (window.shape[1] - 1)
        total += model(window, labels=window).loss.item() * n
        count += n
    model.train(was_training)
    return total / count


def build_model(cfg: TrainConfig, vocab_size: int, token_counts) -> HybridLM:
    overrides = {"vocab_size": vocab_size, **cfg.model_overrides}
    model_config = ModelConfig.from_preset(cfg.preset, **overrides)
    if model_config.vocab_size < vocab_size:
        raise ValueError(
            f"model vocab_size={model_config.vocab_size} is smaller than the tokenizer's "
            f"{vocab_size}: token ids would fall outside the embedding"
        )
    torch.manual_seed(cfg.seed)
    model = HybridLM(model_config)
    if model_config.mlp_type == "token_routed" and model_config.routing == "zipf":
        counts = torch.zeros(model_config.vocab_size, dtype=torch.float64)
        counts[: len(token_counts)] = torch.as_tensor(token_counts, dtype=torch.float64)
        model.set_routing_table(zipf_routing_table(counts, model_config.num_experts))
    return model


def train(cfg: TrainConfig, *, progress: bool = True) -> TrainResult:
    cfg.validate()
    data = load_prepared(cfg.data)
    device = resolve_device(cfg.device)
    model = build_model(cfg, data.vocab_size, data.token_counts).to(device).train()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_config.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")

    sampler = BatchSampler(data.split("train"), cfg.batch_size, cfg.seq_len, seed=cfg.seed)
    val_tokens = data.split("validation")
    optimizer = build_optimizer(model, cfg.lr, cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: warmup_cosine(s, cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio)
    )
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    metrics = (out / "metrics.jsonl").open("w")
    tokens_per_step = cfg.batch_size * cfg.seq_len
    start = time.perf_counter()
    bar = tqdm(range(cfg.steps), desc="train", disable=not progress, dynamic_ncols=True,
               mininterval=2.0)
    loss_value, val_loss, step = math.nan, math.nan, 0
    for step in bar:
        window = sampler.batch(step).to(device)  # (B, T + 1)
        with autocast:
            loss = model(window, labels=window).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        model.balance_step()  # MoE bias balancing from this step's expert loads
        loss_value = loss.item()
        elapsed = time.perf_counter() - start
        record = {"step": step + 1, "loss": loss_value, "lr": scheduler.get_last_lr()[0],
                  "tokens_per_s": tokens_per_step * (step + 1) / elapsed}
        last = step + 1 == cfg.steps or (
            cfg.max_minutes is not None and elapsed > cfg.max_minutes * 60
        )
        if (step + 1) % cfg.eval_every == 0 or last:
            with autocast:
                val_loss = evaluate(model, val_tokens, cfg.seq_len, cfg.batch_size,
                                    cfg.eval_batches, device)
            record["val_loss"] = val_loss
        metrics.write(json.dumps(record) + "\n")
        metrics.flush()
        bar.set_postfix(loss=f"{loss_value:.3f}", val=f"{val_loss:.3f}",
                        lr=f"{record['lr']:.2e}", tok_s=f"{record['tokens_per_s']:.0f}")
        if last:
            break
    bar.close()
    metrics.close()
    seconds = time.perf_counter() - start
    model.save_pretrained(out)
    shutil.copyfile(data.tokenizer_path, out / "tokenizer.json")
    return TrainResult(
        steps=step + 1, train_loss=loss_value, val_loss=val_loss, seconds=seconds,
        tokens_per_s=tokens_per_step * (step + 1) / seconds, out=str(out),
    )
