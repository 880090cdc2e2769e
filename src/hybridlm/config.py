"""ModelConfig: one flat dataclass that describes every hybridlm model, plus named presets.

Variants are chosen by strings (never classes) so a config is always plain JSON. Field names
follow the source documents (`hidden_size`, `num_hidden_layers`, ...), and the fields of one
part share its prefix (`attn_*`, `tr_*` token routing, `moe_*`, `mla_*`, `mamba_*`, `mu_*`,
`pid_*`). Every field is checked by its type and by its rule in FIELD_RULES, however the
config is made (directly, from config.json, a preset with overrides, a run file or `--set`);
every bad value raises `ConfigError` (a ValueError) naming the field, the value and what is
allowed. Model directories written before the fields were renamed load through
`hybridlm.config_legacy`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hybridlm.config_check import (
    ConfigError,
    Rule,
    at_least,
    check_fields,
    check_mapping,
    one_of,
    shorten,
    within,
)
from hybridlm.config_legacy import refuse_renamed
from hybridlm.registry import mixer_letters, mlp_letters, router_names

# Choices of the string fields (mixer, MLP and router names come from hybridlm.registry).
TR_ROUTINGS = ("modulo", "zipf")
MOE_SCORES = ("softmax", "sigmoid")
MOE_BALANCES = ("none", "aux_loss", "aux_free", "ema")
MU_UPDATES = ("clamp", "ema")
EXPERTLESS_MLPS = ("D", "N")  # MLP letters whose layers have no routed experts (count 0)


@dataclass
class ModelConfig:
    # --- sizes -------------------------------------------------------------------------------
    vocab_size: int = 32000  # number of token ids; ids must lie in [0, vocab_size)
    hidden_size: int = 768  # model width d_model
    num_hidden_layers: int = 18  # number of decoder blocks L
    num_attention_heads: int = 12  # query heads n_h; head_dim = hidden_size / n_h
    num_key_value_heads: int = 4  # key/value heads n_kv (GQA); must divide n_h
    intermediate_size: int = 2048  # a D layer's MLP width; a T layer splits it over its experts
    max_position_embeddings: int = 2048  # longest sequence the model (and its cache) accepts
    rope_theta: float = 10000.0  # RoPE base frequency
    rms_norm_eps: float = 1e-6  # epsilon of every RMSNorm
    tie_word_embeddings: bool = True  # lm_head shares the embedding matrix
    initializer_range: float = 0.02  # std of the normal init of linear and embedding weights

    # --- layer layout: pattern strings tiled over the depth ------------------------------------
    mixer_pattern: str = "A"  # A = GQA attention, L = MLA, M = Mamba, or a letter registered in
    #                           hybridlm.registry; "AMMMMMMM" = Jamba 1:7
    mlp_pattern: str = "T"  # D dense SwiGLU, T token-routed experts, E learned MoE, N none (the
    #                         block is its mixer alone, as in Mamba's own stacks), or a letter
    #                         registered in hybridlm.registry; "DE" = experts every other layer
    num_experts_per_layer: list[int] | None = None  # routed experts of each layer (0 on D
    #                                                 layers); None: num_experts on T and E

    # --- attention ---------------------------------------------------------------------------
    attn_qk_norm: bool = True  # RMSNorm over head_dim on q and k before RoPE

    # --- experts of T and E layers -------------------------------------------------------------
    num_experts: int = 4  # routed experts of each T and E layer
    num_shared_experts: int = 1  # shared experts every token passes through, on each T and E
    #                              layer; 0 = none
    shared_expert_intermediate_size: int | None = None  # one shared expert's width; None: as
    #                                                     wide as one routed expert of the layer

    # --- token-routed layers (T): expert = table[token id] --------------------------------------
    tr_routing: str = "modulo"  # "modulo" (id mod E) | "zipf" (frequency-balanced table)

    # --- learned MoE layers (E) ----------------------------------------------------------------
    moe_router: str = "topk"  # "topk" (tokens choose experts) | "expert_choice" (non-causal)
    #                           | a name registered in hybridlm.registry
    moe_intermediate_size: int | None = None  # one learned expert's width; None: intermediate
    moe_top_k: int = 2  # experts per token (topk)
    moe_score: str = "softmax"  # router score: "softmax" | "sigmoid"
    moe_renormalize: bool = True  # rescale the k chosen weights to sum to 1
    moe_capacity_factor: float | None = None  # topk, in training: each expert keeps
    #                                           C = ceil(N * k * factor / E) slots; None = all
    moe_ec_capacity_factor: float = 1.0  # expert_choice: each expert takes C = N * factor / E
    moe_balance: str = "aux_loss"  # "none" | "aux_loss" | "aux_free" (bias) | "ema" (CORVUS)
    moe_aux_loss_coef: float = 0.01  # aux_loss: weight of the Switch loss E * sum_e f_e * P_e
    moe_aux_free_rate: float = 0.001  # aux_free: gamma, the bias step per balance
    moe_ema_rate: float = 0.001  # ema: rate of the bias correction from the load EMA
    moe_ema_decay: float = 0.9  # ema: decay of the load moving average
    moe_shortcut: bool = False  # ScMoE: routed experts read the previous block's input

    # --- Multi-Head Latent Attention (mixer "L") ----------------------------------------------
    mla_kv_rank: int = 512  # width of the cached latent c_kv
    mla_rope_dim: int = 64  # width of the decoupled RoPE key shared by the heads
    mla_q_rank: int | None = None  # low-rank query width; None: full-rank query projection
    mla_absorb: bool = False  # decode with W_uk folded into q and W_uv into the output

    # --- Mamba selective SSM (mixer "M") -------------------------------------------------------
    mamba_d_state: int = 16  # N, state size per channel
    mamba_d_conv: int = 4  # depthwise causal conv width
    mamba_expand: int = 2  # inner width = expand * hidden_size
    mamba_dt_rank: int | None = None  # None: ceil(hidden_size / 16)
    mamba_chunk_size: int = 64  # scan chunk length (time and memory stay linear in length)

    # --- mu guidance (Complexity-Deep 3.3) ---------------------------------------------------
    mu_guidance: bool = True  # q/k/v also read mu_prev through one fused projection
    mu_update: str = "clamp"  # "clamp": mu=clamp(mu_param+W h,-c,c); "ema": mu=a*mu_prev+b*W h
    mu_clamp: float = 2.0  # c of the "clamp" update
    mu_ema_alpha: float = 0.9  # a of the "ema" update (paper eq. 11)
    mu_ema_beta: float = 0.1  # b of the "ema" update

    # --- stability (Complexity-Deep 3.4, 3.5) ------------------------------------------------
    pid_scaler: bool = False  # PiD-style s=sigmoid(Wc[|h|,|mu|,|dmu|]+bc) on residuals
    pid_scaler_bias_init: float = 4.0  # bc at init: s ~ 0.98, training starts near a plain stack
    activation_clamp: float | None = None  # clamp block outputs to [-C, C]; None = off

    def __new__(cls, *args: Any, **kwargs: Any) -> ModelConfig:
        refuse_renamed(kwargs)  # an old field name: ConfigError naming the new one
        return super().__new__(cls)

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def moe_expert_size(self) -> int:
        """Width of one learned expert (E layers)."""
        return self.moe_intermediate_size or self.intermediate_size

    def shared_expert_size(self, routed_expert_size: int) -> int:
        """Width of one shared expert of a layer whose routed experts are
        `routed_expert_size` wide (shared_expert_intermediate_size, or that width)."""
        return self.shared_expert_intermediate_size or routed_expert_size

    @property
    def layer_mixers(self) -> list[str]:
        """Mixer letter of each layer: mixer_pattern tiled over the depth."""
        return _tile(self.mixer_pattern, self.num_hidden_layers)

    @property
    def layer_mlps(self) -> list[str]:
        """MLP letter of each layer: mlp_pattern tiled over the depth."""
        return _tile(self.mlp_pattern, self.num_hidden_layers)

    def experts_in_layer(self, layer: int) -> int:
        """Routed experts of one layer (0 for a dense layer)."""
        if self.layer_mlps[layer] in EXPERTLESS_MLPS:
            return 0
        if self.num_experts_per_layer is not None:
            return self.num_experts_per_layer[layer]
        return self.num_experts

    @property
    def mamba_inner_size(self) -> int:
        return self.mamba_expand * self.hidden_size

    @property
    def mamba_dt_rank_size(self) -> int:
        return self.mamba_dt_rank or -(-self.hidden_size // 16)

    def validate(self) -> None:
        check_fields(self, FIELD_RULES)  # every field's type and range, see FIELD_RULES
        # Relations between fields:
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"num_attention_heads={self.num_attention_heads} must divide "
                f"hidden_size={self.hidden_size}"
            )
        if self.head_dim % 2:
            raise ConfigError(
                f"head_dim = hidden_size/num_attention_heads = {self.head_dim} must be even "
                "for RoPE"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_key_value_heads={self.num_key_value_heads} must divide "
                f"num_attention_heads={self.num_attention_heads}"
            )
        self._validate_pattern("mixer_pattern", mixer_letters())
        self._validate_pattern("mlp_pattern", mlp_letters())
        self._validate_experts()
        self._validate_moe()
        if self.mla_rope_dim % 2:
            raise ConfigError(f"mla_rope_dim={self.mla_rope_dim} must be even for RoPE")

    def _validate_pattern(self, name: str, letters: dict[str, str]) -> None:
        """A non-empty string of registered letters whose length divides the depth."""
        pattern = getattr(self, name)
        if not pattern:
            raise ConfigError(f"{name}={pattern!r} must be a non-empty string of {letters}")
        unknown = sorted(set(pattern) - set(letters))
        if unknown:
            raise ConfigError(
                f"{name}={shorten(pattern)} has unknown letters {shorten(unknown)}; "
                f"allowed: {letters}"
            )
        if self.num_hidden_layers % len(pattern):
            raise ConfigError(
                f"{name}={shorten(pattern)} (length {len(pattern)}) does not tile "
                f"num_hidden_layers={self.num_hidden_layers}: the length must divide the depth"
            )

    def _expert_counts(self) -> list[tuple[str, int, str]]:
        """(mlp letter, routed experts, where the count comes from) of the layers, read from
        the pattern (or from num_experts_per_layer when given): never one entry per layer
        of a depth the config merely names, so validating takes no time in proportion."""
        pattern = self.mlp_pattern
        if self.num_experts_per_layer is None:
            return [(letter, 0 if letter in EXPERTLESS_MLPS else self.num_experts,
                     "num_experts")
                    for letter in dict.fromkeys(pattern)]
        return [(pattern[layer % len(pattern)], count, f"num_experts_per_layer[{layer}]")
                for layer, count in enumerate(self.num_experts_per_layer)]

    def _validate_experts(self) -> None:
        per_layer, depth = self.num_experts_per_layer, self.num_hidden_layers
        if per_layer is not None and len(per_layer) != depth:
            raise ConfigError(
                f"num_experts_per_layer={shorten(per_layer)} must list one count per layer "
                f"(num_hidden_layers={depth})"
            )
        where = f"of mlp_pattern={self.mlp_pattern!r}"
        for letter, count, source in self._expert_counts():
            if letter in EXPERTLESS_MLPS and count != 0:
                kind = "dense" if letter == "D" else "without an MLP"
                raise ConfigError(f"{source}={count} but the layer is {kind} (mlp letter "
                                  f"{letter} {where}): use 0")
            if letter not in EXPERTLESS_MLPS and count < 1:
                raise ConfigError(f"{source}={count!r} must be >= 1 on an expert layer (mlp "
                                  f"letter {letter} {where})")
            if letter == "T" and self.intermediate_size % count:
                raise ConfigError(
                    f"{source}={count} must divide intermediate_size={self.intermediate_size} "
                    "(a token-routed layer splits the MLP width over its experts)"
                )

    def _validate_moe(self) -> None:
        if self.moe_router == "expert_choice" and self.moe_capacity_factor is not None:
            raise ConfigError(
                f"moe_capacity_factor={self.moe_capacity_factor} applies to moe_router='topk'; "
                "expert choice reads moe_ec_capacity_factor"
            )
        learned = [(count, source) for letter, count, source in self._expert_counts()
                   if letter == "E"]
        if self.moe_router == "topk" and learned:
            count, source = min(learned)
            if self.moe_top_k > count:
                raise ConfigError(
                    f"moe_top_k={self.moe_top_k} exceeds the {count} experts of a learned-MoE "
                    f"layer ({source})"
                )

    # --- serialisation -----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """From plain data (config.json, a preset with overrides); any bad field or value
        raises ConfigError naming it."""
        return cls(**check_model_mapping(data, what="ModelConfig"))

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2, sort_keys=True)
        if path is not None:
            Path(path).write_text(text + "\n")
        return text

    @classmethod
    def from_json(cls, path_or_text: str | Path) -> ModelConfig:
        text = str(path_or_text)
        if not text.lstrip().startswith("{"):
            text = Path(path_or_text).read_text()
        return cls.from_dict(json.loads(text))

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> ModelConfig:
        if not isinstance(name, str) or name not in PRESETS:
            raise ConfigError(f"unknown preset {shorten(name)}; allowed: {sorted(PRESETS)}")
        return cls.from_dict({**PRESETS[name], **overrides})


def check_model_mapping(data: Any, *, what: str, prefix: str = "") -> dict[str, Any]:
    """`data`, a mapping of some ModelConfig fields (config.json, overrides), checked field by
    field (`check_mapping`); a field of the release before the rename raises ConfigError
    naming its new name."""
    if isinstance(data, dict):
        refuse_renamed(data)
    return check_mapping(ModelConfig, data, FIELD_RULES, what=what, prefix=prefix)


def _tile(pattern: str, depth: int) -> list[str]:
    return [pattern[i % len(pattern)] for i in range(depth)]


# What each field allows beyond its type (the annotation); ModelConfig.validate checks both
# through hybridlm.config_check, then the relations between fields.
_POSITIVE = at_least(1)
FIELD_RULES: dict[str, Rule] = {
    **dict.fromkeys(
        ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
         "num_key_value_heads", "intermediate_size", "max_position_embeddings", "num_experts",
         "shared_expert_intermediate_size", "moe_top_k", "moe_intermediate_size",
         "mla_kv_rank", "mla_rope_dim", "mla_q_rank", "mamba_d_state", "mamba_d_conv",
         "mamba_expand", "mamba_dt_rank", "mamba_chunk_size"),
        _POSITIVE),
    "rope_theta": at_least(0, strict=True),
    "rms_norm_eps": at_least(0, strict=True),
    "initializer_range": at_least(0, strict=True),
    "num_experts_per_layer": at_least(0),  # each entry; >= 1 on expert layers (validate)
    "num_shared_experts": at_least(0),
    "tr_routing": one_of(TR_ROUTINGS),
    "moe_router": lambda name: None if name in router_names() else (
        f"is not one of {list(router_names())}"),
    "moe_score": one_of(MOE_SCORES),
    "moe_balance": one_of(MOE_BALANCES),
    "moe_aux_loss_coef": at_least(0),
    "moe_aux_free_rate": at_least(0),
    "moe_ema_rate": at_least(0),
    "moe_ema_decay": within(0, 1, high_open=True),
    "moe_capacity_factor": at_least(0, strict=True),
    "moe_ec_capacity_factor": at_least(0, strict=True),
    "mu_update": one_of(MU_UPDATES),
    "mu_clamp": at_least(0, strict=True),
    "mu_ema_alpha": within(0, 1),
    "mu_ema_beta": within(0, 1),
    "activation_clamp": at_least(0, strict=True),
}


# Presets are data: overrides of the dataclass defaults (which are the 187M model).
def _nexus(intermediate_size: int, **sizes: Any) -> dict[str, Any]:
    """Learned MoE every other layer, top-2 with loss-free bias balancing and one shared
    expert half as wide as a routed one."""
    return dict(
        mlp_pattern="DE", moe_router="topk", moe_top_k=2, moe_capacity_factor=1.25,
        num_shared_experts=1, shared_expert_intermediate_size=intermediate_size // 2,
        moe_balance="aux_free", mu_guidance=False, max_position_embeddings=4096,
        intermediate_size=intermediate_size, **sizes,
    )


PRESETS: dict[str, dict[str, Any]] = {
    # Complexity-Deep 187M (project page): 4 experts of 512 + a 512-wide shared expert.
    "complexity-deep-187m": {},
    # Complexity-Deep 1.5B (paper Table 3), same components as the 187M model.
    # With mu projections and a shared expert these dimensions give ~2.08B parameters;
    # the paper's "1.5B" is met only by attention + routed experts alone (see README).
    "complexity-deep-1.5b": dict(
        hidden_size=2048, num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=4,
        intermediate_size=8192, max_position_embeddings=4096,
    ),
    # Nexus hybrids (MoE research note): attention + Mamba, MoE every other layer, top-2 of
    # learned experts with a half-width shared expert and loss-free bias balancing.
    # The note gives only width, depth and expert counts; the other sizes are ours, and the
    # resulting counts differ from the note's table (see README, `hybridlm presets`).
    "nexus-tiny": _nexus(1024, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=4, mixer_pattern="AMMM", num_experts=4),
    "nexus-small": _nexus(2048, hidden_size=512, num_hidden_layers=6, num_attention_heads=8,
                          num_key_value_heads=8, mixer_pattern="AMMMMM", num_experts=8,
                          num_experts_per_layer=[0, 8, 0, 8, 0, 16]),
    "nexus-base": _nexus(4096, hidden_size=1024, num_hidden_layers=12, num_attention_heads=16,
                         num_key_value_heads=16, mixer_pattern="AMMMMM", num_experts=16),
    "nexus-large": _nexus(8192, hidden_size=2048, num_hidden_layers=24, num_attention_heads=16,
                          num_key_value_heads=16, mixer_pattern="AMMMMMMM", num_experts=32),
    # Jamba layout at CPU size: one attention layer per eight, MoE every other layer.
    "jamba-tiny": {**_nexus(512, vocab_size=8192, hidden_size=128, num_hidden_layers=8,
                            num_attention_heads=4, num_key_value_heads=2,
                            mixer_pattern="AMMMMMMM", num_experts=4),
                   "num_shared_experts": 0, "shared_expert_intermediate_size": None,
                   "max_position_embeddings": 512},
    # CORVUS-CORAX's MLA case: d = 4096 with a 512-wide cached latent (d / d_c = 8).
    "corvus-mla": dict(
        hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
        intermediate_size=11008, mlp_pattern="D", mu_guidance=False, mixer_pattern="L",
        mla_kv_rank=512, mla_rope_dim=64, mla_q_rank=1536, max_position_embeddings=4096,
    ),
    # CPU-sized model for tests and the demo.
    "tiny": dict(
        vocab_size=8192, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=1024, max_position_embeddings=512,
    ),
}
