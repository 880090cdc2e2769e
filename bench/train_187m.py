"""complexity-deep-187m training step vs HF LlamaForCausalLM at the same ACTIVE dimensions.

The preset's MLP is token-routed (4 experts of 512 plus a 512-wide shared expert), so a token
does the work of a 1024-wide SwiGLU: the peer is a Llama with 768 hidden, 18 layers, 12/4
heads, MLP 1024, vocab 32000, tied embeddings. A second hybridlm model, "dense, no mu", is
the same stack with a dense 1024-wide SwiGLU and no mu guidance: Llama's architecture plus
QK-norm, which separates the cost of the routing and of mu from the cost of the rest.
Batch 8 x 2048 tokens, bf16 autocast, fused AdamW (bench/step.py); each model eager and
under torch.compile, the peer too.
"""

from __future__ import annotations

from typing import Any

import torch

from bench import peers
from bench.step import flops_per_token, measure_hybridlm, measure_training
from bench.timing import Measured, Row, attempt, peer_row
from hybridlm import HybridLM, ModelConfig

NAME = "train_187m"
PRESET = "complexity-deep-187m"
# Quick runs keep the preset's layout at a size a CPU trains in milliseconds.
QUICK_SIZES: dict[str, Any] = dict(
    vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, intermediate_size=256, max_position_embeddings=64,
)


def shape(quick: bool) -> tuple[int, int]:
    """(batch, tokens per row) of a training step."""
    return (2, 32) if quick else (8, 2048)


def config(quick: bool, **overrides: Any) -> ModelConfig:
    return ModelConfig.from_preset(PRESET, **{**(QUICK_SIZES if quick else {}), **overrides})


def active_mlp_width(model: HybridLM) -> int:
    """The width of a dense SwiGLU that does the work one token does in layer 0's MLP:
    its parameters a token uses, over the 3 x hidden of one SwiGLU column."""
    mlp = model.layers[0].mlp
    used = sum(p.numel() for p in mlp.parameters())
    if hasattr(mlp, "inactive_parameters"):
        used -= mlp.inactive_parameters()
    return round(used / (3 * model.config.hidden_size))


def dense_overrides(quick: bool) -> dict[str, Any]:
    """The same stack with a dense SwiGLU as wide as the token's active MLP and no mu."""
    with torch.device("meta"):  # sizes only: no memory, no init
        width = active_mlp_width(HybridLM(config(quick)))
    return dict(mlp_pattern="D", intermediate_size=width, mu_guidance=False)


def measure_llama(cfg: ModelConfig, device: torch.device, compiled: bool,
                  quick: bool) -> Measured:
    batch, seq = shape(quick)
    with torch.device("meta"):
        width = active_mlp_width(HybridLM(cfg))
    torch.manual_seed(0)
    with device:
        model = peers.hf_llama(cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads,
                               cfg.num_key_value_heads, width, cfg.vocab_size,
                               cfg.max_position_embeddings, device).train()
    params = sum(p.numel() for p in model.parameters())  # tied head counted once
    flops = flops_per_token(params, cfg.num_hidden_layers, cfg.hidden_size, seq)
    return measure_training(model, device, batch=batch, seq=seq, vocab=cfg.vocab_size,
                            flops=flops, compiled=compiled, quick=quick)


def run(device: torch.device, quick: bool) -> list[Row]:
    preset, dense = config(quick), config(quick, **dense_overrides(quick))
    batch, seq = shape(quick)
    ours = {
        (kind, compiled): attempt(
            f"hybridlm {kind} {'compiled' if compiled else 'eager'}",
            lambda c=cfg, k=compiled: measure_hybridlm(c, device, batch=batch, seq=seq,
                                                       compiled=k, quick=quick))
        for kind, cfg in (("preset", preset), ("dense", dense))
        for compiled in (False, True)
    }
    llama = {
        compiled: peers.peer_attempt(
            f"HF Llama {'compiled' if compiled else 'eager'}",
            lambda k=compiled: measure_llama(preset, device, k, quick))
        for compiled in (False, True)
    }
    eager_name, compiled_name = "HF LlamaForCausalLM eager", "HF LlamaForCausalLM compiled"
    precision = "bf16 autocast, fused AdamW" if device.type == "cuda" else "fp32, AdamW"
    note = f"B{batch} x T{seq}, {precision}"
    return [
        peer_row(NAME, "187m train step, eager", "tokens/s", ours["preset", False],
                 eager_name, llama[False], note),
        peer_row(NAME, "187m train step, compiled", "tokens/s", ours["preset", True],
                 compiled_name, llama[True], note + "; torch.compile(model), both sides"),
        peer_row(NAME, "187m compiled vs HF eager", "tokens/s", ours["preset", True],
                 eager_name, llama[False], "the 2x target: compiled hybridlm over eager HF"),
        peer_row(NAME, "187m dense MLP, no mu, eager", "tokens/s", ours["dense", False],
                 eager_name, llama[False], "dense SwiGLU as wide as the active MLP"),
        peer_row(NAME, "187m dense MLP, no mu, compiled", "tokens/s", ours["dense", True],
                 compiled_name, llama[True], "dense SwiGLU as wide as the active MLP"),
    ]
