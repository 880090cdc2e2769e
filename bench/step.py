"""One training step, timed the same way for hybridlm and its HF peer.

A step is what the trainer does for one batch on one GPU: forward under bf16 autocast with
the labels (the model computes the shifted next-token loss, as HF models do), backward,
fused AdamW (weight decay on matrices only, `hybridlm.train.optim.param_groups`, for both
sides), gradients dropped, then the MoE balancing update where the model has one.
Token ids are real random ids, rotated over three batches.

MFU = tokens/s x FLOPs per token / the card's dense bf16 peak, with FLOPs per token =
6 x active parameters + 12 x attention layers x hidden x sequence length (the attention
scores and their weighted sum, forward and backward), the count the trainer logs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from bench.timing import Measured, measure
from hybridlm import HybridLM, ModelConfig
from hybridlm.train.optim import param_groups
from hybridlm.train.trainer import PEAK_BF16_FLOPS

BATCHES = 3  # id batches rotated between timed steps


def peak_flops(device: torch.device) -> float | None:
    """Dense bf16 peak of the card (FLOP/s), None where unknown (the CPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_FLOPS.items() if key in name), None)


def flops_per_token(active_params: int, attention_layers: int, hidden: int, seq: int) -> float:
    return 6 * active_params + 12 * attention_layers * hidden * seq


def compile_model(model: nn.Module, quick: bool) -> nn.Module:
    """`torch.compile(model)` in its default mode, the same call for hybridlm and the peer.
    Quick runs (CPU smoke tests) trace with dynamo and AOTAutograd but skip code generation
    (backend "aot_eager"): the tracing is what a CPU can check in seconds."""
    torch._dynamo.reset()  # no guards or cache entries left over from the previous model
    return torch.compile(model, backend="aot_eager") if quick else torch.compile(model)


def training_step(model: nn.Module, forward: Callable[..., object], device: torch.device,
                  after_step: Callable[[], None] | None = None,
                  forward_kwargs: dict[str, Any] | None = None) -> Callable[[torch.Tensor], None]:
    """A function of ids (B, T) that runs one optimizer step of `model` through `forward`
    (the model itself or its compiled form), called with `forward_kwargs` besides the ids."""
    extra = forward_kwargs or {}
    optimizer = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-4, betas=(0.9, 0.95),
                                  fused=device.type == "cuda")
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else contextlib.nullcontext())

    def step(ids: torch.Tensor) -> None:
        with autocast:
            loss = forward(input_ids=ids, labels=ids, **extra).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if after_step is not None:
            after_step()

    return step


def measure_training(
    model: nn.Module, device: torch.device, *, batch: int, seq: int, vocab: int,
    flops: float, compiled: bool, quick: bool, after_step: Callable[[], None] | None = None,
    forward_kwargs: dict[str, Any] | None = None,
) -> Measured:
    """tokens/s of `model`'s training step on (batch, seq) ids, with MFU (`flops` per token)
    and the peak memory in the extras."""
    forward = compile_model(model, quick) if compiled else model
    step = training_step(model, forward, device, after_step, forward_kwargs)
    ids = [(torch.randint(0, vocab, (batch, seq), device=device),) for _ in range(BATCHES)]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    timing = measure(step, device, warmup=3, repeats=10, inputs=ids, quick=quick)
    result = Measured.of(timing, batch * seq)
    peak = peak_flops(device)
    if peak is not None:
        result.extra["mfu"] = result.value * flops / peak
    if device.type == "cuda":
        result.extra["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return result


def measure_hybridlm(cfg: ModelConfig, device: torch.device, *, batch: int, seq: int,
                     compiled: bool, quick: bool) -> Measured:
    """`measure_training` of a fresh HybridLM built from `cfg` on `device`, with its MoE
    balancing after every step (a no-op for models without balanced experts)."""
    torch.manual_seed(0)
    with device:
        model = HybridLM(cfg).train()
    attention_layers = sum(m in "AL" for m in cfg.layer_mixers)
    flops = flops_per_token(model.num_parameters(active=True), attention_layers,
                            cfg.hidden_size, seq)
    return measure_training(model, device, batch=batch, seq=seq, vocab=cfg.vocab_size,
                            flops=flops, compiled=compiled, quick=quick,
                            after_step=model.balance_step,
                            forward_kwargs={"return_logits": False})  # as the trainer calls it
