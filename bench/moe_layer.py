"""Expert layers forward + backward at equal active FLOPs, in active TFLOP/s.

16384 tokens of width 1024, bf16 weights and activations (fp32 on the CPU):
  dense          hybridlm's dense SwiGLU, 5632 wide: the rate the experts should approach;
  learned top-2  hybridlm's learned MoE, 8 experts of 2816, top-2, no shared expert (Mixtral's
                 layout), in training mode (load counts and aux loss included);
  token-routed   hybridlm's token-routed MLP, 4 experts of 5632 (one per token, the same
                 active width), no shared expert, random token ids through the modulo table;
  HF Mixtral     MixtralSparseMoeBlock at the learned layer's sizes, with its eager and its
                 grouped_mm experts; the faster is the peer.
Active FLOPs of one call: 3 (forward + two backward products) x 2 x 3 matrices x hidden x
active width x tokens. Inputs, output gradients and token ids rotate over three sets.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from bench import peers
from bench.timing import Measured, Row, attempt, measure, peer_row
from hybridlm import ModelConfig
from hybridlm.layers.mlps import build_mlp

NAME = "moe_layer"
INPUT_SETS = 3
HF_EXPERTS = ("eager", "grouped_mm")


def sizes(quick: bool) -> dict[str, int]:
    if quick:
        return dict(hidden=64, expert=96, experts=8, top_k=2, routed_experts=4, tokens=256)
    return dict(hidden=1024, expert=2816, experts=8, top_k=2, routed_experts=4, tokens=16384)


def active_width(quick: bool) -> int:
    s = sizes(quick)
    return s["top_k"] * s["expert"]


def layer_config(quick: bool, **overrides) -> ModelConfig:
    s = sizes(quick)
    return ModelConfig(hidden_size=s["hidden"], num_attention_heads=4, num_key_value_heads=4,
                       num_hidden_layers=1, mu_guidance=False, **overrides)


def build(kind: str, quick: bool, device: torch.device) -> nn.Module:
    """hybridlm's MLP of one kind ("dense", "learned", "token_routed") through the MLP
    registry, as a model builds it."""
    s, width = sizes(quick), active_width(quick)
    overrides = {
        "dense": dict(mlp_pattern="D", intermediate_size=width),
        "learned": dict(mlp_pattern="E", num_experts=s["experts"],
                        moe_top_k=s["top_k"], moe_intermediate_size=s["expert"],
                        num_shared_experts=0, moe_balance="aux_loss"),
        "token_routed": dict(mlp_pattern="T",
                             num_experts=s["routed_experts"],
                             intermediate_size=s["routed_experts"] * width, num_shared_experts=0),
    }[kind]
    torch.manual_seed(0)
    with device:
        return build_mlp(layer_config(quick, **overrides), 0).train()


def measure_layer(layer: nn.Module, call: Callable, device: torch.device, quick: bool,
                  vocab: int) -> Measured:
    """Active TFLOP/s of call(layer, x (1, N, H), token_ids (1, N)) forward + backward."""
    s = sizes(quick)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    layer = layer.to(dtype)
    sets = [
        (torch.randn(1, s["tokens"], s["hidden"], device=device, dtype=dtype, requires_grad=True),
         torch.randn(1, s["tokens"], s["hidden"], device=device, dtype=dtype),
         torch.randint(0, vocab, (1, s["tokens"]), device=device))
        for _ in range(INPUT_SETS)
    ]

    def fwd_bwd(x: torch.Tensor, grad: torch.Tensor, token_ids: torch.Tensor) -> None:
        call(layer, x, token_ids).backward(grad)
        x.grad = None
        layer.zero_grad(set_to_none=True)

    flops = 18 * s["hidden"] * active_width(quick) * s["tokens"]
    timing = measure(fwd_bwd, device, warmup=5, repeats=20, inputs=sets, quick=quick)
    return Measured.of(timing, flops / 1e12)


def ours(kind: str, device: torch.device, quick: bool) -> Measured:
    layer = build(kind, quick, device)
    vocab = ModelConfig().vocab_size
    return measure_layer(layer, lambda m, x, ids: m(x, token_ids=ids)[0], device, quick, vocab)


def hf(implementation: str, device: torch.device, quick: bool) -> Measured:
    s = sizes(quick)
    torch.manual_seed(0)
    block = peers.hf_mixtral_block(s["hidden"], s["expert"], s["experts"], s["top_k"],
                                   implementation, device).train()
    return measure_layer(block, lambda m, x, ids: m(x), device, quick, vocab=1)


def best_peer(device: torch.device, quick: bool) -> tuple[tuple, str]:
    """The faster of HF Mixtral's expert implementations, and a note naming each rate."""
    tried = {impl: peers.peer_attempt(f"HF Mixtral block, {impl} experts",
                                      lambda i=impl: hf(i, device, quick))
             for impl in HF_EXPERTS}
    measured = {impl: r for impl, r in tried.items() if r[0] is not None}
    if not measured:
        return next(iter(tried.values())), ""
    best = max(measured, key=lambda impl: measured[impl][0].value)
    note = ", ".join(f"{impl} {r[0].value:.4g}" for impl, r in measured.items())
    return measured[best], f"HF experts: {note} TFLOP/s"


def run(device: torch.device, quick: bool) -> list[Row]:
    s, width = sizes(quick), active_width(quick)
    dense = attempt(f"dense SwiGLU ff{width}", lambda: ours("dense", device, quick))
    learned = attempt("learned top-2", lambda: ours("learned", device, quick))
    routed = attempt("token-routed", lambda: ours("token_routed", device, quick))
    mixtral, mixtral_note = best_peer(device, quick)
    learned_name = f"learned top-{s['top_k']} E{s['experts']} ff{s['expert']}"
    routed_name = f"token-routed E{s['routed_experts']} ff{width}"
    dense_name = f"hybridlm dense SwiGLU ff{width}"
    tokens = f"{s['tokens']} tokens d{s['hidden']}"
    unit = "active TFLOP/s"
    return [
        peer_row(NAME, f"dense SwiGLU ff{width} fwd+bwd", unit, dense, None, note=tokens),
        peer_row(NAME, f"{learned_name} vs dense", unit, learned, dense_name, dense, tokens),
        peer_row(NAME, f"{learned_name} vs HF Mixtral", unit, learned, "HF MixtralSparseMoeBlock",
                 mixtral, mixtral_note),
        peer_row(NAME, f"{routed_name} vs dense", unit, routed, dense_name, dense, tokens),
        peer_row(NAME, f"{routed_name} vs HF Mixtral", unit, routed, "HF MixtralSparseMoeBlock",
                 mixtral, mixtral_note),
    ]
