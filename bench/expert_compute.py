"""Expert compute on one GPU: hybridlm's MoE layers against a dense SwiGLU of the same active
FLOPs, HF Mixtral's sparse block, and the loop reference, in one process.

Forward + backward of 16,384 tokens at d1024: learned top-2 of 8 experts of width 2816, and
token-routed with 4 experts of width 5632, against a dense SwiGLU of width 5632 (the active
width of both). Active FLOPs = 3 (forward + backward) x 2 x 3 matmuls x d x width x tokens;
the router's (N x E) product is left out. Every layer in bf16 (weights and activations; the
router still computes in fp32), timed with CUDA events (median), eager and compiled.

    python -m bench.expert_compute --out results/expert_compute.json
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable

import torch
from torch import nn

from bench.timing import cuda_median_ms
from hybridlm import ops
from hybridlm.config import ModelConfig
from hybridlm.layers.mlp import SwiGLU
from hybridlm.layers.moe import MoEMLP
from hybridlm.layers.token_routed import TokenRoutedMLP

D, WIDTH, EXPERTS, TOP_K, TOKENS, VOCAB = 1024, 2816, 8, 2, 16384, 32000


def timed(fn) -> float:
    return cuda_median_ms(fn, repeats=15)


def matmul_ms(size: int) -> float:
    mat = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    return timed(lambda: mat @ mat)


def fwd_bwd(module: nn.Module, x: torch.Tensor, **kwargs) -> Callable[[], None]:
    def step() -> None:
        out = module(x, **kwargs)
        out = out[0] if isinstance(out, tuple) else out
        out.float().square().mean().backward()

    return step


def learned_moe(capacity_factor: float | None = None) -> MoEMLP:
    cfg = ModelConfig(hidden_size=D, num_attention_heads=8, num_key_value_heads=8,
                      intermediate_size=WIDTH, moe_intermediate_size=WIDTH, mlp_pattern="E",
                      num_experts=EXPERTS, moe_top_k=TOP_K, num_shared_experts=0,
                      moe_balance="none", moe_capacity_factor=capacity_factor)
    moe = MoEMLP(cfg, EXPERTS)
    moe.experts.init_stacked_weights(0.02, 0.02)
    return moe


def token_routed() -> TokenRoutedMLP:
    mlp = TokenRoutedMLP(D, WIDTH * TOP_K, 4, VOCAB, num_shared_experts=0)
    mlp.experts.init_stacked_weights(0.02, 0.02)
    return mlp


def hf_mixtral() -> nn.Module | None:
    try:
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    except ImportError:
        return None
    cfg = MixtralConfig(hidden_size=D, intermediate_size=WIDTH, num_local_experts=EXPERTS,
                        num_experts_per_tok=TOP_K)
    return MixtralSparseMoeBlock(cfg)


def rows(compile_too: bool) -> dict[str, float]:
    dev, bf16 = "cuda", torch.bfloat16
    active_flops = 3 * 2 * 3 * D * WIDTH * TOP_K * TOKENS
    x = torch.randn(1, TOKENS, D, device=dev, dtype=bf16, requires_grad=True)
    ids = torch.randint(0, VOCAB, (1, TOKENS), device=dev)
    results: dict[str, float] = {}

    def record(name: str, ms: float, flops: float = active_flops) -> None:
        results[name] = flops / ms / 1e9
        print(f"{name:52s} {ms:8.3f} ms {results[name]:7.0f} TFLOP/s", flush=True)

    record("ceiling: bf16 matmul 8192^3", matmul_ms(8192), 2 * 8192**3)
    layers = {"dense SwiGLU d1024 ff5632": (SwiGLU(D, WIDTH * TOP_K), {}),
              "learned top-2 E8 ff2816": (learned_moe(), {}),
              "learned top-2 E8 ff2816 capacity 1.25": (learned_moe(1.25), {}),
              "token-routed E4 ff5632": (token_routed(), {"token_ids": ids}),
              "HF MixtralSparseMoeBlock E8 top-2": (hf_mixtral(), {})}
    for name, (module, kwargs) in layers.items():
        if module is None:
            continue
        module = module.to(dev, bf16).train()
        record(f"{name} eager", timed(fwd_bwd(module, x, **kwargs)))
        if name == "learned top-2 E8 ff2816":
            with ops.use_impl("reference"):
                record(f"{name} eager, loop reference", timed(fwd_bwd(module, x, **kwargs)))
        if compile_too and not name.startswith(("HF", "learned top-2 E8 ff2816 capacity")):
            compiled = torch.compile(module, fullgraph=True)
            record(f"{name} compiled", timed(fwd_bwd(compiled, x, **kwargs)))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write the TFLOP/s per row as JSON here")
    parser.add_argument("--no-compile", action="store_true", help="eager rows only")
    args = parser.parse_args()
    print(torch.__version__, torch.cuda.get_device_name(), flush=True)
    results = rows(compile_too=not args.no_compile)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                       "tflops": results}, f, indent=1)


if __name__ == "__main__":
    main()
