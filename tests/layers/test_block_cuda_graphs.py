"""Single blocks capture in a CUDA graph, forward and backward, and the replays equal eager.

Every expert-compute path is covered: token-routed (A+T), learned top-2 with capacity and a
shared expert (A+E), expert choice (A+E), Mamba with top-2 (M+E), and MLA with a dense MLP
(L+D) for the mixers. The pattern is the one PyTorch documents for whole-network capture:
warm up on a side stream, capture forward, loss and backward into one graph, then copy new
values into the static inputs and replay. Each replay's output, expert counts and gradients
(input and every parameter) must match an eager step on the same values, in fp32 and under
bf16 autocast (where the experts take torch._grouped_mm on sm90). The MoE blocks are also
captured at a decode shape (B=8, T=1, forward only, no cache: the layer caches' own capture
is tested with them).

Marked gpu; skipped without CUDA. The selection logic itself is covered on CPU by
tests/ops/test_capture_dispatch.py.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from hybridlm import ops
from hybridlm.config import ModelConfig
from hybridlm.layers.block import Block
from hybridlm.layers.experts import GroupedExperts
from hybridlm.layers.moe import causal_routing

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

H, VOCAB = 64, 128
TOP2 = dict(moe_router="topk", moe_top_k=2)
BLOCKS = {
    "attention+token_routed": dict(mixer_pattern="A", mlp_pattern="T"),
    "attention+top2_capacity_shared": dict(mixer_pattern="A", mlp_pattern="E", **TOP2,
                                           moe_capacity_factor=1.0, num_shared_experts=1),
    "attention+expert_choice": dict(mixer_pattern="A", mlp_pattern="E",
                                    moe_router="expert_choice", moe_ec_capacity_factor=1.5),
    "mamba+top2": dict(mixer_pattern="M", mlp_pattern="E", **TOP2),
    "mla+dense": dict(mixer_pattern="L", mlp_pattern="D"),
}
MOE_BLOCKS = [name for name in BLOCKS if not name.endswith("dense")]
# Relative error (Frobenius) of a replay against eager: both run the same kernels, so only
# atomics' summation order and cuBLAS's choices under capture may differ.
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 1e-2}


def build_block(name: str) -> Block:
    torch.manual_seed(0)
    config = ModelConfig(
        vocab_size=VOCAB, hidden_size=H, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=256, num_experts=4, moe_intermediate_size=64,
        moe_balance="aux_loss", mamba_d_state=16, mla_kv_rank=32, mla_rope_dim=16,
        mla_q_rank=32, max_position_embeddings=64, **BLOCKS[name],
    )
    block = Block(config, 0).cuda()
    with torch.no_grad():  # stacked experts start as torch.empty; wide gates vary the routing
        for module in block.modules():
            if isinstance(module, GroupedExperts):
                module.init_stacked_weights(0.1, 0.1)
        for param_name, param in block.named_parameters():
            if "router.gate" in param_name:
                param.normal_(0.0, 0.3)
    return block


def new_inputs(batch: int, seq: int, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {"h": torch.randn(batch, seq, H, generator=gen).cuda(),
            "mu_prev": torch.randn(batch, seq, H, generator=gen).cuda(),
            "token_ids": torch.randint(0, VOCAB, (batch, seq), generator=gen).cuda()}


def autocast(dtype: torch.dtype) -> contextlib.AbstractContextManager:
    # Capture needs autocast's cast cache off: cached casts would outlive the graph's pool.
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=dtype, cache_enabled=False)


def train_step(block: Block, inputs: dict[str, torch.Tensor], probe: torch.Tensor,
               dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """Forward, a fixed projection of the output (+ the aux loss) and its gradients ->
    (output, expert counts, d/dh, d/dparameter for each parameter)."""
    h = inputs["h"]
    positions = torch.arange(h.shape[1], device=h.device)
    with autocast(dtype):
        out, _, stats = block(h, token_ids=inputs["token_ids"], positions=positions,
                              cache=None, mu_prev=inputs["mu_prev"])
    loss = (out.float() * probe).sum() + stats.get("aux_loss", 0.0)
    grads = torch.autograd.grad(loss, [h, *block.parameters()], allow_unused=True,
                                materialize_grads=True)
    counts = stats.get("expert_counts", torch.zeros(0, device=h.device))
    # Detached: a kept autograd graph would keep its AccumulateGrad nodes, and their stream,
    # alive into the next step.
    return (out.detach(), counts, *grads)


def forward_step(block: Block, inputs: dict[str, torch.Tensor],
                 dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    h = inputs["h"]
    positions = torch.arange(h.shape[1], device=h.device)
    with torch.no_grad(), autocast(dtype):
        out, _, stats = block(h, token_ids=inputs["token_ids"], positions=positions,
                              cache=None, mu_prev=inputs["mu_prev"])
    return out, stats["expert_counts"]


def capture(step, static: dict[str, torch.Tensor]) -> tuple[torch.cuda.CUDAGraph, tuple]:
    """Warm up `step` on a side stream (kernels compiled, allocator settled), then capture
    it once -> the graph and its static outputs."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step(static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = step(static)
    return graph, outputs


def replay(graph: torch.cuda.CUDAGraph, static: dict[str, torch.Tensor],
           outputs: tuple, values: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    with torch.no_grad():
        for key, value in values.items():
            static[key].copy_(value)
    graph.replay()
    return [t.clone() for t in outputs]


def assert_matches(got: list[torch.Tensor], want: tuple, dtype: torch.dtype) -> None:
    out, counts, *grads = got
    assert torch.equal(counts, want[1])  # same routing: same data-dependent slot counts
    for index, (g, w) in enumerate(zip([out, *grads], [want[0], *want[2:]], strict=True)):
        error = float((g.float() - w.float()).norm() / w.float().norm().clamp_min(1e-6))
        assert error < TOLERANCE[dtype], f"tensor {index} (0: output, 1: d/dh): {error:.2e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", list(BLOCKS))
def test_a_block_captures_forward_and_backward_and_replays_like_eager(name, dtype):
    block = build_block(name).train()  # training: capacity drops slots, loads are counted
    static = new_inputs(2, 24, seed=0)  # 48 tokens: no multiple of any tile
    static["h"].requires_grad_()
    probe = torch.randn(2, 24, H, generator=torch.Generator().manual_seed(9)).cuda()
    graph, outputs = capture(lambda inputs: train_step(block, inputs, probe, dtype), static)
    replays = []
    for seed in (1, 2):
        values = new_inputs(2, 24, seed)
        got = replay(graph, static, outputs, values)
        eager_h = values["h"].clone().requires_grad_()
        want = train_step(block, {**values, "h": eager_h}, probe, dtype)
        assert_matches(got, want, dtype)
        replays.append(got[0])
    assert not torch.equal(replays[0], replays[1])  # the replays read the new values


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", MOE_BLOCKS)
def test_a_moe_block_captures_at_decode_shape(name, dtype):
    """Eval forward of B=8 sequences of one token (expert choice routes causally there, as
    in generation)."""
    block = build_block(name).eval()
    static = new_inputs(8, 1, seed=0)
    with causal_routing(block):
        graph, outputs = capture(lambda inputs: forward_step(block, inputs, dtype), static)
        for seed in (1, 2):
            values = new_inputs(8, 1, seed)
            out, counts = replay(graph, static, outputs, values)
            want_out, want_counts = forward_step(block, values, dtype)
            assert torch.equal(counts, want_counts)
            error = float((out.float() - want_out.float()).norm() / want_out.float().norm())
            assert error < TOLERANCE[dtype]


def test_the_forced_reference_is_refused_inside_a_capture_by_name():
    """Last in this file: the refused capture ends before any kernel was recorded."""
    ids = torch.randint(0, 4, (16,), device="cuda")
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="ops.sort_by_expert.*CUDA graph capture"):
        with ops.use_impl("reference"), torch.cuda.graph(graph):
            ops.sort_by_expert(ids, 4)
