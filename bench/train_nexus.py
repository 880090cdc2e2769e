"""nexus-small training step (attention + Mamba, learned top-2 MoE every other layer with
loss-free bias balancing): tokens/s eager and under torch.compile. No peer: no library
ships this hybrid. Batch 8 x 2048 tokens, the step of bench/step.py, balancing included."""

from __future__ import annotations

from typing import Any

import torch

from bench.step import measure_hybridlm
from bench.timing import Measured, Row, attempt, peer_row
from hybridlm import ModelConfig

NAME = "train_nexus"
PRESET = "nexus-small"
QUICK_SIZES: dict[str, Any] = dict(
    vocab_size=512, hidden_size=64, num_attention_heads=4, num_key_value_heads=4,
    intermediate_size=128, num_experts=4, num_experts_per_layer=[0, 4, 0, 4, 0, 4],
    max_position_embeddings=64,
)


def measure_nexus(device: torch.device, compiled: bool, quick: bool) -> Measured:
    batch, seq = (2, 32) if quick else (8, 2048)
    cfg = ModelConfig.from_preset(PRESET, **(QUICK_SIZES if quick else {}))
    return measure_hybridlm(cfg, device, batch=batch, seq=seq, compiled=compiled, quick=quick)


def run(device: torch.device, quick: bool) -> list[Row]:
    note = "B2 x T32" if quick else "B8 x T2048"
    return [
        peer_row(NAME, "nexus-small train step, eager", "tokens/s",
                 attempt("nexus-small eager", lambda: measure_nexus(device, False, quick)),
                 None, note=note),
        peer_row(NAME, "nexus-small train step, compiled", "tokens/s",
                 attempt("nexus-small compiled", lambda: measure_nexus(device, True, quick)),
                 None, note=note + "; torch.compile(model)"),
    ]
