"""ModelConfig fields of hybridlm 0.1.0 before the rename, and the mapping to today's.

`upgrade(data)` turns a config.json written by that release into today's fields, building
the same model; it is applied where saved files are read (`from_pretrained`, model
directories given to `init_from`/`--model`, a resumed run's checkpoint). Everywhere else
(`ModelConfig(...)`, `from_dict`, presets, run files, `--set`) an old name raises ConfigError
with `RENAMED[name]`, which says what to write instead.

    old                                       today
    mlp_type + mlp_pattern                    mlp_pattern (D dense, T token-routed, E learned)
    routing                                   tr_routing
    shared_expert, moe_num_shared,            num_shared_experts (on T and E layers alike),
      shared_expert_ratio                     shared_expert_intermediate_size
    moe_capacity_factor (expert choice)       moe_ec_capacity_factor
    moe_bias_update_rate                      moe_aux_free_rate (aux_free) | moe_ema_rate (ema)
    moe_load_ema_decay                        moe_ema_decay
    use_qk_norm, use_mu_guidance              attn_qk_norm, mu_guidance
    use_dynamic_scaler, scaler_bias_init      pid_scaler, pid_scaler_bias_init
"""

from __future__ import annotations

from typing import Any

from hybridlm.config_check import ConfigError

RENAMED = {
    "mlp_type": "mlp_type was removed: mlp_pattern names each layer's MLP (D dense, "
                "T token-routed, E learned MoE), e.g. mlp_pattern='DE'",
    "routing": "routing was renamed to tr_routing",
    "shared_expert": "shared_expert was replaced by num_shared_experts (0 = none), which "
                     "applies to token-routed and learned-MoE layers alike",
    "moe_num_shared": "moe_num_shared was renamed to num_shared_experts",
    "shared_expert_ratio": "shared_expert_ratio was replaced by "
                           "shared_expert_intermediate_size (a width; None: as wide as one "
                           "routed expert)",
    "moe_bias_update_rate": "moe_bias_update_rate was split into moe_aux_free_rate "
                            "(moe_balance='aux_free') and moe_ema_rate (moe_balance='ema')",
    "moe_load_ema_decay": "moe_load_ema_decay was renamed to moe_ema_decay",
    "use_qk_norm": "use_qk_norm was renamed to attn_qk_norm",
    "use_mu_guidance": "use_mu_guidance was renamed to mu_guidance",
    "use_dynamic_scaler": "use_dynamic_scaler was renamed to pid_scaler",
    "scaler_bias_init": "scaler_bias_init was renamed to pid_scaler_bias_init",
}
_PLAIN = {"routing": "tr_routing", "moe_load_ema_decay": "moe_ema_decay",
          "use_qk_norm": "attn_qk_norm", "use_mu_guidance": "mu_guidance",
          "use_dynamic_scaler": "pid_scaler", "scaler_bias_init": "pid_scaler_bias_init"}
# The old release's defaults of the fields the mapping reads (a config.json may omit any).
_OLD_DEFAULTS = dict(
    mlp_type="token_routed", mlp_pattern=None, shared_expert=True,
    shared_expert_intermediate_size=None, moe_num_shared=0, shared_expert_ratio=1.0,
    moe_router="topk", moe_balance="aux_loss", moe_capacity_factor=None,
    moe_bias_update_rate=0.001, intermediate_size=2048, moe_intermediate_size=None,
    num_experts=4, num_experts_per_layer=None,
)


def refuse_renamed(names: Any) -> None:
    """ConfigError naming the new field of every old name among `names`."""
    old = [RENAMED[name] for name in names if isinstance(name, str) and name in RENAMED]
    if old:
        raise ConfigError("; ".join(old) + " (model directories written before the rename "
                          "load with from_pretrained)")


def is_legacy(data: dict[str, Any]) -> bool:
    return any(name in RENAMED for name in data)


def upgrade(data: dict[str, Any]) -> dict[str, Any]:
    """A config.json mapping of the old release -> today's fields, the same model; a mapping
    without old names is returned as it is. Raises ConfigError for a config the one
    shared-expert scheme cannot express (a learned-MoE stack whose token-routed layers have
    shared experts of another width or count than its learned ones)."""
    if not isinstance(data, dict) or not is_legacy(data):
        return data
    try:
        return _upgrade(data)
    except (TypeError, AttributeError, ArithmeticError) as err:  # values of the wrong type
        raise ConfigError(f"a config of the release before the rename with a bad value: "
                          f"{err}") from None


def _upgrade(data: dict[str, Any]) -> dict[str, Any]:
    old = {**_OLD_DEFAULTS, **data}
    new = {k: v for k, v in data.items() if k not in RENAMED and k not in _OLD_DEFAULTS}
    for name, renamed in _PLAIN.items():
        if name in data:
            new[renamed] = data[name]
    for name in ("shared_expert_intermediate_size", "moe_router", "moe_balance",
                 "intermediate_size", "moe_intermediate_size", "num_experts",
                 "num_experts_per_layer"):
        if name in data:
            new[name] = data[name]
    pattern = _mlp_pattern(old)
    new["mlp_pattern"] = pattern
    new.update(_shared_experts(old, pattern))
    factor = old["moe_capacity_factor"]
    if old["moe_router"] == "expert_choice":
        new["moe_ec_capacity_factor"] = 1.0 if factor is None else factor
        new["moe_capacity_factor"] = None
    else:
        new["moe_capacity_factor"] = factor
    rate = {"aux_free": "moe_aux_free_rate", "ema": "moe_ema_rate"}.get(old["moe_balance"])
    if rate is not None:
        new[rate] = old["moe_bias_update_rate"]
    return new


def _mlp_pattern(old: dict[str, Any]) -> str:
    """mlp_pattern of today: the old one (None: all D when dense, else all E), with E read as
    T under mlp_type='token_routed' (E meant the global mlp_type)."""
    kind = old["mlp_type"]
    pattern = old["mlp_pattern"] or ("D" if kind == "dense" else "E")
    return pattern.replace("E", "T") if kind == "token_routed" else pattern


def _shared_experts(old: dict[str, Any], pattern: str) -> dict[str, Any]:
    """num_shared_experts and shared_expert_intermediate_size giving every expert layer the
    shared experts it had: T layers one of shared_expert_intermediate_size (None: the routed
    expert's width) when shared_expert, E layers moe_num_shared of round(ratio * width)."""
    layers = _expert_layers(old, pattern)
    if not layers:
        return {}
    shared = []  # (count, width of one, width of one routed expert) per distinct layer
    for letter, experts in layers:
        if letter == "T":
            routed = old["intermediate_size"] // experts
            width = old["shared_expert_intermediate_size"] or routed
            shared.append((1 if old["shared_expert"] else 0, width, routed))
        else:
            routed = old["moe_intermediate_size"] or old["intermediate_size"]
            width = max(1, round(old["shared_expert_ratio"] * routed))
            shared.append((old["moe_num_shared"], width, routed))
    counts = {count for count, _, _ in shared}
    if counts == {0}:
        return {"num_shared_experts": 0, "shared_expert_intermediate_size": None}
    widths = {width for _, width, _ in shared}
    if len(counts) == 1 and all(width == routed for _, width, routed in shared):
        return {"num_shared_experts": counts.pop(), "shared_expert_intermediate_size": None}
    if len(counts) == 1 and len(widths) == 1:
        return {"num_shared_experts": counts.pop(), "shared_expert_intermediate_size":
                widths.pop()}
    raise ConfigError(
        "this config.json gives its token-routed and learned-MoE layers shared experts of "
        f"different counts or widths ({sorted(set(shared))} as (count, width, routed width)); "
        "today one num_shared_experts and shared_expert_intermediate_size apply to every "
        "expert layer"
    )


def _expert_layers(old: dict[str, Any], pattern: str) -> set[tuple[str, int]]:
    """The distinct (kind letter T or E, routed experts) of the layers with experts."""
    per_layer = old["num_experts_per_layer"]
    if per_layer is None:
        return {(letter, old["num_experts"]) for letter in pattern if letter in "TE"}
    return {(pattern[i % len(pattern)], count) for i, count in enumerate(per_layer)
            if pattern[i % len(pattern)] in "TE"}
