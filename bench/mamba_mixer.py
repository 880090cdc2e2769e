"""The Mamba mixer (layers/mamba.py, whatever scan `hybridlm.ops` picks on this device),
forward + backward, vs HF transformers' MambaMixer on its pure-torch path (no mamba_ssm
kernels: a Python loop over time). d768, N16, expand 2 (Din 1536), conv 4, fp32 weights
under bf16 autocast, random inputs and output gradients rotated over three sets.

Rows: tokens/s at B8 x L2048 and B2 x L8192 (the same tokens per call), and the second over
the first: a scan linear in length keeps that ratio near 1. The peer runs at L2048 only.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from bench import peers
from bench.timing import Measured, Row, attempt, measure, peer_row
from hybridlm import ModelConfig
from hybridlm.layers.mamba import Mamba

NAME = "mamba_mixer"
HIDDEN, D_STATE, EXPAND, D_CONV = 768, 16, 2, 4
INPUT_SETS = 3


def shapes(quick: bool) -> list[tuple[int, int]]:
    """(batch, length) pairs, the second 4x longer at the same tokens per call."""
    return [(2, 64), (1, 128)] if quick else [(8, 2048), (2, 8192)]


def hidden_size(quick: bool) -> int:
    return 64 if quick else HIDDEN


def dtype_and_autocast(
    device: torch.device,
) -> tuple[torch.dtype, contextlib.AbstractContextManager]:
    """bf16 activations under bf16 autocast on a GPU; fp32 without autocast on the CPU."""
    if device.type == "cuda":
        return torch.bfloat16, torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.float32, contextlib.nullcontext()


def measure_mixer(mixer: nn.Module, call, device: torch.device, batch: int, length: int,
                  warmup: int, quick: bool) -> Measured:
    """tokens/s of call(mixer, x) forward + backward with a random output gradient."""
    hidden = mixer.out_proj.out_features
    dtype, autocast = dtype_and_autocast(device)
    sets = [
        (torch.randn(batch, length, hidden, device=device, dtype=dtype, requires_grad=True),
         torch.randn(batch, length, hidden, device=device, dtype=dtype))
        for _ in range(INPUT_SETS)
    ]

    def fwd_bwd(x: torch.Tensor, grad: torch.Tensor) -> None:
        with autocast:
            y = call(mixer, x)
        y.backward(grad)
        x.grad = None
        mixer.zero_grad(set_to_none=True)

    timing = measure(fwd_bwd, device, warmup=warmup, inputs=sets, quick=quick)
    return Measured.of(timing, batch * length)


def mixer_config(quick: bool) -> ModelConfig:
    return ModelConfig(hidden_size=hidden_size(quick), num_attention_heads=4,
                       num_key_value_heads=4, num_hidden_layers=1, mixer_pattern="M",
                       mamba_d_state=D_STATE, mamba_expand=EXPAND, mamba_d_conv=D_CONV)


def ours(device: torch.device, quick: bool, batch: int, length: int) -> Measured:
    torch.manual_seed(0)
    with device:
        mixer = Mamba(mixer_config(quick), 0)
    positions = torch.arange(length, device=device)
    return measure_mixer(mixer, lambda m, x: m(x, positions=positions), device, batch, length,
                         warmup=3, quick=quick)


def hf(device: torch.device, quick: bool, batch: int, length: int) -> Measured:
    dt_rank = mixer_config(quick).mamba_dt_rank_size  # the peer gets hybridlm's sizes
    torch.manual_seed(0)
    mixer = peers.hf_mamba_mixer(hidden_size(quick), D_STATE, EXPAND, D_CONV, dt_rank, device)
    # One warm-up call: the loop runs the same kernels every step, nothing to compile.
    return measure_mixer(mixer, lambda m, x: m(x), device, batch, length, warmup=1, quick=quick)


def run(device: torch.device, quick: bool) -> list[Row]:
    (short_b, short_l), (long_b, long_l) = shapes(quick)
    sizes = f"d{hidden_size(quick)} N{D_STATE} Din {EXPAND * hidden_size(quick)}"
    short = attempt(f"hybridlm Mamba B{short_b} L{short_l}",
                    lambda: ours(device, quick, short_b, short_l))
    peer = peers.peer_attempt(f"HF MambaMixer B{short_b} L{short_l}",
                              lambda: hf(device, quick, short_b, short_l))
    long = attempt(f"hybridlm Mamba B{long_b} L{long_l}",
                   lambda: ours(device, quick, long_b, long_l))
    # HF's torch path launches its kernels once per time step (about 9 s a call at B8 L2048
    # on an H100), so eleven calls at 4x the length would take most of a run's time.
    skipped = (None, f"n/a: measured at L{short_l} only (its loop over time makes a call at "
                     f"L{long_l} last 4x longer)")
    return [
        peer_row(NAME, f"Mamba mixer fwd+bwd B{short_b} L{short_l}", "tokens/s", short,
                 "HF MambaMixer, torch path", peer, sizes),
        peer_row(NAME, f"Mamba mixer fwd+bwd B{long_b} L{long_l}", "tokens/s", long,
                 "HF MambaMixer, torch path", skipped, sizes),
        peer_row(NAME, f"Mamba mixer L{long_l} vs L{short_l}", "tokens/s", long,
                 f"hybridlm B{short_b} L{short_l}", short, "linear time keeps this near 1"),
    ]
