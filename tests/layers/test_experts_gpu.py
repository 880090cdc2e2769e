"""On a GPU, every expert layer runs forward and backward without waiting for the device:
CUDA's sync debug mode turns any host synchronisation into an error. Marked gpu."""

from __future__ import annotations

import pytest
import torch

from hybridlm.config import ModelConfig
from hybridlm.layers.moe import MoEMLP
from hybridlm.layers.token_routed import TokenRoutedMLP

LEARNED = {"topk": dict(moe_router="topk", moe_top_k=2),
           "topk_capacity": dict(moe_router="topk", moe_top_k=2, moe_capacity_factor=1.0,
                                 moe_balance="aux_loss"),
           "expert_choice": dict(moe_router="expert_choice", moe_ec_capacity_factor=1.5)}


def layer(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "token_routed":
        mlp = TokenRoutedMLP(64, 128, 4, vocab_size=100, shared_expert_size=64)
    else:
        cfg = ModelConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=4,
                          intermediate_size=128, mlp_pattern="E", num_experts=8,
                          num_shared_experts=1, **LEARNED[kind])
        mlp = MoEMLP(cfg, 8)
    with torch.no_grad():  # the stacked expert weights start uninitialised (torch.empty)
        for p in mlp.parameters():
            p.normal_(0.0, 0.1)
    return mlp


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", [*LEARNED, "token_routed"])
def test_expert_layers_never_synchronise(kind):
    mlp = layer(kind).cuda().train()
    x = torch.randn(2, 100, 64, device="cuda", requires_grad=True)  # 200 tokens: not /16
    ids = torch.randint(0, 100, (2, 100), device="cuda")
    kwargs = {"token_ids": ids}
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y, stats = mlp(x, **kwargs)
        loss = y.float().square().mean() + stats.get("aux_loss", 0.0)
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
