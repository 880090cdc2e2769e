"""The built-in routers of learned-MoE layers: their builders and registry entries.

`moe_router` names a router through `hybridlm.registry`; MoEMLP builds it with
`builder(config, num_experts)`. Adding a router = a `Router` subclass (layers/routing.py
says what a learned-MoE router returns) + one `register_router` line (here for a built-in,
or in your own code before the config is made).
"""

from __future__ import annotations

from hybridlm.config import ModelConfig
from hybridlm.layers.moe import ExpertChoiceRouter, TopKRouter
from hybridlm.layers.routing import Router
from hybridlm.registry import register_router


def build_topk(config: ModelConfig, num_experts: int) -> Router:
    c = config
    return TopKRouter(c.hidden_size, num_experts, c.moe_top_k, c.moe_score, c.moe_renormalize,
                      c.moe_capacity_factor)


def build_expert_choice(config: ModelConfig, num_experts: int) -> Router:
    c = config
    return ExpertChoiceRouter(c.hidden_size, num_experts, c.moe_ec_capacity_factor, c.moe_score)


register_router("topk", build_topk, "tokens choose their moe_top_k best experts")
register_router("expert_choice", build_expert_choice,
                "experts choose their best tokens (not causal)")
