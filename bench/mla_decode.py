"""One decode step of a corvus-mla latent-attention layer (d4096, 32 heads, latent 512 + RoPE
key 64) over a cache of 32768 tokens per row, batch 8, bf16 weights and cache.

A step must read every cached latent and RoPE key once: batch x (S + 1) x (r + dr) x 2 bytes
(302 MB here), far more than its weights (78 MB). The rate is those cache bytes over the
step's time, read against the device copy bandwidth measured in the same process (bytes read
plus written, so a pure read can pass 100%). Plain (K/V rebuilt per head from the latent)
and absorbed (attention over the latent itself, `mla_absorb`) both run; the cache contents are
random, the query tokens rotate over three sets, and the cache's length is reset before each
step so every step reads the same S tokens.

On CUDA the absorbed step also runs as a CUDA graph, as the engine runs decode steps: the
cache's key window (`key_window`) fixes the keys read to S + 1, so nothing waits on the host
and the step's time is the device's.
"""

from __future__ import annotations

from typing import Any

import torch

from bench.ceilings import copy_bandwidth
from bench.timing import Measured, Row, attempt, measure, peer_row
from hybridlm import ModelConfig
from hybridlm.infer.decode_graphs import captured
from hybridlm.layers.mla import MultiHeadLatentAttention

NAME = "mla_decode"
PRESET = "corvus-mla"
QUICK_SIZES: dict[str, Any] = dict(
    hidden_size=128, num_attention_heads=4, num_key_value_heads=4, intermediate_size=256,
    mla_kv_rank=32, mla_rope_dim=16, mla_q_rank=48,
)
INPUT_SETS = 3


def shape(quick: bool) -> tuple[int, int]:
    """(batch, cached tokens per row)."""
    return (2, 256) if quick else (8, 32768)


def cache_bytes(layer: MultiHeadLatentAttention, batch: int, slots: int, itemsize: int) -> int:
    return batch * slots * (layer.kv_rank + layer.rope_dim) * itemsize


def measure_decode(absorb: bool, device: torch.device, quick: bool,
                   graph: bool = False) -> Measured:
    batch, cached = shape(quick)
    cfg = ModelConfig.from_preset(PRESET, **(QUICK_SIZES if quick else {}), num_hidden_layers=1,
                                  max_position_embeddings=cached + 1, mla_absorb=absorb)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    with device:
        layer = MultiHeadLatentAttention(cfg, 0).to(dtype).eval()
    cache = layer.new_cache(batch, cached + 1, device, dtype)
    cache.c_kv.normal_()  # random contents: a normalised latent has unit scale
    cache.k_rope.normal_()
    start = torch.full((batch,), cached, dtype=torch.long, device=device)
    positions = torch.tensor([cached], device=device)  # (T,) the new token's position
    queries = [(torch.randn(batch, 1, cfg.hidden_size, device=device, dtype=dtype),)
               for _ in range(INPUT_SETS)]

    @torch.inference_mode()
    def step(x: torch.Tensor) -> None:
        cache.lengths = start  # every step reads the same S cached tokens, writes slot S
        layer(x, positions=positions, cache=cache)

    if graph:
        step = graphed(step, queries[0][0].clone(), cache, cached + 1)
    timing = measure(step, device, warmup=5, repeats=30, inputs=queries, quick=quick)
    read = cache_bytes(layer, batch, cached + 1, cache.c_kv.element_size())
    weights = sum(p.numel() * p.element_size() for p in layer.parameters())
    return Measured.of(timing, read / 1e9, cache_bytes=read, weight_bytes=weights)


def graphed(step, static_x: torch.Tensor, cache, window: int):
    """step as a CUDA graph over a fixed key window: (x) -> copy x in, replay."""
    cache.key_window = window
    graph, _ = captured(lambda: step(static_x))  # its warm-up compiles the Triton kernel

    def replay(x: torch.Tensor) -> None:
        static_x.copy_(x)
        graph.replay()

    return replay


def run(device: torch.device, quick: bool) -> list[Row]:
    batch, cached = shape(quick)
    copy = attempt("device copy", lambda: copy_bandwidth(device, quick))
    rows = []
    variants = [(False, "plain", False), (True, "absorbed", False)]
    if device.type == "cuda":
        variants.append((True, "absorbed, CUDA graph", True))
    for absorb, label, graph in variants:
        result = attempt(f"MLA decode {label}",
                         lambda a=absorb, g=graph: measure_decode(a, device, quick, g))
        ms = f"{result[0].extra['ms']:.3f} ms/step; " if result[0] else ""
        rows.append(peer_row(NAME, f"MLA decode {label} B{batch} S{cached}", "GB/s", result,
                             "device copy (read+write)", copy,
                             f"{ms}GB/s of the cache bytes a step must read"))
    return rows
