"""Mixtral <-> hybridlm: GQA attention ("A") + learned top-k MoE on every layer ("E").

Router semantics match exactly: Mixtral takes a softmax over all experts (fp32), keeps the
top k and rescales those k weights to sum to 1; hybridlm's "topk" router with
moe_score="softmax" and moe_renormalize=True does the same (layers/moe.TopKRouter), with no
selection bias (expert_bias zero) and no capacity (nothing dropped).

Expert weights: HF stacks gate and up as gate_up_proj (E, 2I, H) for x @ W^T and down_proj
(E, H, I); hybridlm stacks w_gate, w_up (E, H, I) and w_down (E, I, H) for x @ W.

Glossary: E experts, H hidden, I expert width.
"""

from __future__ import annotations

from typing import Any

import torch

from hybridlm.config import ModelConfig
from hybridlm.convert.common import (
    ConvertError,
    Family,
    State,
    check_gqa_fields,
    gqa_from_hf,
    gqa_sizes,
    gqa_sizes_to_hf,
    gqa_to_hf,
    refuse_unless,
    require_transformers,
    take,
)


def config_from_hf(hf_config: Any) -> ModelConfig:
    check_gqa_fields(hf_config)
    refuse_unless(hf_config, "sliding_window", None, "it attends to the whole past")
    refuse_unless(hf_config, "router_jitter_noise", (0.0, 0), "its router has no input noise")
    return ModelConfig(
        **gqa_sizes(hf_config), mlp_pattern="E", attn_qk_norm=False,
        num_experts=hf_config.num_local_experts, moe_router="topk",
        moe_top_k=hf_config.num_experts_per_tok, moe_score="softmax", moe_renormalize=True,
        moe_intermediate_size=hf_config.intermediate_size, moe_capacity_factor=None,
        moe_balance="aux_loss", moe_aux_loss_coef=float(hf_config.router_aux_loss_coef),
    )


def _experts_from_hf(hf: State, src: str, dst: str) -> State:
    gate_up = take(hf, src + "experts.gate_up_proj")  # (E, 2I, H)
    gate, up = gate_up.chunk(2, dim=1)  # (E, I, H) each: gate first, as Mixtral splits
    down = take(hf, src + "experts.down_proj")  # (E, H, I)
    router = take(hf, src + "gate.weight")  # (E, H)
    return {
        dst + "router.gate.weight": router,
        dst + "router.expert_bias": torch.zeros(router.shape[0], dtype=torch.float32),
        dst + "experts.w_gate": gate.transpose(1, 2).contiguous(),  # (E, H, I)
        dst + "experts.w_up": up.transpose(1, 2).contiguous(),  # (E, H, I)
        dst + "experts.w_down": down.transpose(1, 2).contiguous(),  # (E, I, H)
    }


def weights_from_hf(hf: State, config: ModelConfig) -> State:
    return gqa_from_hf(hf, config, _experts_from_hf, qk_norm=False)


def fits(config: ModelConfig) -> bool:
    return set(config.layer_mixers) == {"A"} and set(config.layer_mlps) == {"E"}


def refusals(config: ModelConfig) -> list[str]:
    """Why a learned-MoE stack is not Mixtral (empty: it is)."""
    c, why = config, []
    if c.attn_qk_norm:
        why.append("attn_qk_norm=True (Mixtral's attention has no QK-norm)")
    if c.moe_router != "topk":
        why.append(f"moe_router={c.moe_router!r} (Mixtral's tokens choose their experts: topk)")
    if c.moe_score != "softmax" or not c.moe_renormalize:
        why.append(f"moe_score={c.moe_score!r}, moe_renormalize={c.moe_renormalize} (Mixtral "
                   "renormalises the top-k of a softmax)")
    if c.moe_capacity_factor is not None:
        why.append(f"moe_capacity_factor={c.moe_capacity_factor} (Mixtral drops no tokens; "
                   "set it to null)")
    if c.num_experts_per_layer is not None and len(set(c.num_experts_per_layer)) > 1:
        why.append(f"num_experts_per_layer={c.num_experts_per_layer} (Mixtral has one count)")
    if c.moe_shortcut:
        why.append("moe_shortcut=True (ScMoE: Mixtral's experts read their own layer's input)")
    return why


def config_to_hf(config: ModelConfig, token_ids: dict[str, Any]) -> Any:
    transformers = require_transformers()
    c = config
    fields = gqa_sizes_to_hf(c)
    fields.pop("attention_bias")  # Mixtral has no such field: its attention never has bias
    fields["intermediate_size"] = c.moe_expert_size
    return transformers.MixtralConfig(
        **fields, num_local_experts=c.experts_in_layer(0), num_experts_per_tok=c.moe_top_k,
        router_aux_loss_coef=c.moe_aux_loss_coef, router_jitter_noise=0.0, sliding_window=None,
        **token_ids)


def _experts_to_hf(state: State, src: str, dst: str) -> State:
    bias = take(state, src + "router.expert_bias")
    if bool(bias.ne(0).any()):
        raise ConvertError(f"{src}router.expert_bias is not zero (aux-free or ema balancing "
                           "moved it): Mixtral's router has no selection bias")
    gate = take(state, src + "experts.w_gate").transpose(1, 2)  # (E, I, H)
    up = take(state, src + "experts.w_up").transpose(1, 2)  # (E, I, H)
    return {
        dst + "gate.weight": take(state, src + "router.gate.weight"),
        dst + "experts.gate_up_proj": torch.cat([gate, up], dim=1).contiguous(),  # (E, 2I, H)
        dst + "experts.down_proj": take(state, src + "experts.w_down").transpose(1, 2)
        .contiguous(),  # (E, H, I)
    }


def weights_to_hf(state: State, config: ModelConfig) -> State:
    state = {k: v for k, v in state.items() if not k.endswith(".mlp.load_ema")}
    return gqa_to_hf(state, config, _experts_to_hf, qk_norm=False)


FAMILY = Family("Mixtral", "mixtral", config_from_hf, weights_from_hf, fits, config_to_hf,
                weights_to_hf)
