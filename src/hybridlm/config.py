"""ModelConfig: one flat dataclass that describes every hybridlm model, plus named presets.

Variants are chosen by strings (never classes) so a config is always plain JSON. Field names
follow the source documents (`hidden_size`, `num_hidden_layers`, `mlp_type`, ...). Every field
is checked by its type and by its rule in FIELD_RULES, however the config is made (directly,
from config.json, a preset with overrides, a run file or `--set`); every bad value raises
`ConfigError` (a ValueError) naming the field, the value and what is allowed.
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
from hybridlm.mixer_registry import mixer_letters

MLP_TYPES = ("dense", "token_routed", "moe")
ROUTINGS = ("modulo", "zipf")
MU_UPDATES = ("clamp", "ema")
# The builders are in layers/mlp_registry.py (register_mlp adds letters here too).
MLP_LETTERS = {
    "D": "dense SwiGLU",
    "T": "token-routed experts",
    "E": "learned MoE (token-routed when mlp_type='token_routed')",
}
MOE_ROUTERS = ("topk", "expert_choice")
MOE_SCORES = ("softmax", "sigmoid")
MOE_BALANCES = ("none", "aux_loss", "aux_free", "ema")


@dataclass
class ModelConfig:
    # --- sizes -------------------------------------------------------------------------------
    vocab_size: int = 32000  # number of token ids; ids must lie in [0, vocab_size)
    hidden_size: int = 768  # model width d_model
    num_hidden_layers: int = 18  # number of decoder blocks L
    num_attention_heads: int = 12  # query heads n_h; head_dim = hidden_size / n_h
    num_key_value_heads: int = 4  # key/value heads n_kv (GQA); must divide n_h
    intermediate_size: int = 2048  # MLP width; for token_routed, the TOTAL over all experts
    max_position_embeddings: int = 2048  # longest sequence the model (and its cache) accepts
    rope_theta: float = 10000.0  # RoPE base frequency
    rms_norm_eps: float = 1e-6  # epsilon of every RMSNorm
    tie_word_embeddings: bool = True  # lm_head shares the embedding matrix
    initializer_range: float = 0.02  # std of the normal init of linear and embedding weights

    # --- layer layout: pattern strings tiled over the depth ------------------------------------
    mixer_pattern: str = "A"  # A = GQA attention, L = MLA, M = Mamba, or a letter registered in
    #                           hybridlm.mixer_registry; "AMMMMMMM" = Jamba 1:7
    mlp_pattern: str | None = None  # D dense, T token-routed, E learned MoE (token-routed when
    #                                 mlp_type="token_routed"); None: all E (all D when
    #                                 mlp_type="dense"); "DE" = experts every other layer
    num_experts_per_layer: list[int] | None = None  # experts of each layer (0 on D layers);
    #                                                 None: num_experts on every E layer

    # --- attention ---------------------------------------------------------------------------
    use_qk_norm: bool = True  # RMSNorm over head_dim on q and k before RoPE

    # --- MLP: dense SwiGLU, Token-Routed MLP, or learned MoE ----------------------------------
    mlp_type: str = "token_routed"  # "dense" | "token_routed" (expert = table[id]) | "moe"
    num_experts: int = 4  # routed experts per E layer; token_routed: each intermediate/E wide
    shared_expert: bool = True  # add a dense SwiGLU every token passes through
    shared_expert_intermediate_size: int | None = None  # None: as wide as one routed expert
    routing: str = "modulo"  # "modulo" (id mod E) | "zipf" (frequency-balanced table)

    # --- learned MoE (mlp_type="moe") ---------------------------------------------------------
    moe_router: str = "topk"  # "topk" (tokens choose experts) | "expert_choice" (non-causal)
    moe_top_k: int = 2  # experts per token (topk)
    moe_score: str = "softmax"  # router score: "softmax" | "sigmoid"
    moe_renormalize: bool = True  # rescale the k chosen weights to sum to 1
    moe_balance: str = "aux_loss"  # "none" | "aux_loss" | "aux_free" (bias) | "ema" (CORVUS)
    moe_aux_loss_coef: float = 0.01  # weight of the Switch aux loss E * sum_e f_e * P_e
    moe_bias_update_rate: float = 0.001  # gamma of aux_free / rate of ema balancing
    moe_load_ema_decay: float = 0.9  # ema balancing: decay of the load moving average
    moe_capacity_factor: float | None = None  # topk: None = no dropping; expert_choice: C =
    #                                           N * factor / E (None -> 1.0)
    moe_intermediate_size: int | None = None  # width of one routed expert; None: intermediate
    moe_num_shared: int = 0  # shared experts every token passes through
    shared_expert_ratio: float = 1.0  # shared expert width / routed expert width
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
    use_mu_guidance: bool = True  # q/k/v also read mu_prev through one fused projection
    mu_update: str = "clamp"  # "clamp": mu=clamp(mu_param+W h,-c,c); "ema": mu=a*mu_prev+b*W h
    mu_clamp: float = 2.0  # c of the "clamp" update
    mu_ema_alpha: float = 0.9  # a of the "ema" update (paper eq. 11)
    mu_ema_beta: float = 0.1  # b of the "ema" update

    # --- stability (Complexity-Deep 3.4, 3.5) ------------------------------------------------
    use_dynamic_scaler: bool = False  # PiD-style s=sigmoid(Wc[|h|,|mu|,|dmu|]+bc) on residuals
    scaler_bias_init: float = 4.0  # bc at init: s ~ 0.98, so training starts near a plain stack
    activation_clamp: float | None = None  # clamp block outputs to [-C, C]; None = off

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def expert_intermediate_size(self) -> int:
        """Width of one routed expert (token_routed splits intermediate_size over them)."""
        if self.mlp_type == "token_routed":
            return self.intermediate_size // self.num_experts
        if self.mlp_type == "moe" and self.moe_intermediate_size is not None:
            return self.moe_intermediate_size
        return self.intermediate_size

    @property
    def layer_mixers(self) -> list[str]:
        """Mixer letter of each layer: mixer_pattern tiled over the depth."""
        return _tile(self.mixer_pattern, self.num_hidden_layers)

    @property
    def layer_mlps(self) -> list[str]:
        """MLP letter of each layer (D, T, E or a registered one; see layer_mlp_kinds)."""
        default = "D" if self.mlp_type == "dense" else "E"
        return _tile(self.mlp_pattern or default, self.num_hidden_layers)

    @property
    def layer_mlp_kinds(self) -> list[str]:
        """MLP kind letter of each layer: `layer_mlps` with E read as T under
        mlp_type="token_routed" (how configs written before T meant it)."""
        return [self._mlp_kind(letter) for letter in self.layer_mlps]

    def _mlp_kind(self, letter: str) -> str:
        return "T" if letter == "E" and self.mlp_type == "token_routed" else letter

    def experts_in_layer(self, layer: int) -> int:
        """Routed experts of one layer (0 for a dense layer)."""
        if self.layer_mlps[layer] == "D":
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

    @property
    def shared_intermediate_size(self) -> int:
        if self.shared_expert_intermediate_size is not None:
            return self.shared_expert_intermediate_size
        return self.expert_intermediate_size

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
        mlp_letters = self.mlp_pattern or ("D" if self.mlp_type == "dense" else "E")
        token_routed = any(self._mlp_kind(letter) == "T" for letter in mlp_letters)
        if token_routed and self.intermediate_size % self.num_experts:
            raise ConfigError(
                f"num_experts={self.num_experts} must divide intermediate_size="
                f"{self.intermediate_size} (token_routed splits the MLP width over the experts)"
            )
        self._validate_layout()
        self._validate_moe()
        if self.mla_rope_dim % 2:
            raise ConfigError(f"mla_rope_dim={self.mla_rope_dim} must be even for RoPE")

    def _validate_layout(self) -> None:
        depth = self.num_hidden_layers
        # Mixer letters come from the mixer registry, so a registered mixer is accepted here.
        for name, letters in (("mixer_pattern", mixer_letters()), ("mlp_pattern", MLP_LETTERS)):
            pattern = getattr(self, name)
            if pattern is None and name == "mlp_pattern":
                continue
            if not pattern:
                raise ConfigError(f"{name}={pattern!r} must be a non-empty string of {letters}")
            unknown = sorted(set(pattern) - set(letters))
            if unknown:
                raise ConfigError(
                    f"{name}={shorten(pattern)} has unknown letters {shorten(unknown)}; "
                    f"allowed: {letters}"
                )
            if depth % len(pattern):
                raise ConfigError(
                    f"{name}={shorten(pattern)} (length {len(pattern)}) does not tile "
                    f"num_hidden_layers={depth}: the length must divide the depth"
                )
        # The checks below read the pattern, never one entry per layer: a config may name any
        # depth, and validating it must not take time or memory in proportion.
        mlp_letters = self.mlp_pattern or ("D" if self.mlp_type == "dense" else "E")
        if self.mlp_type == "dense" and "E" in mlp_letters:
            raise ConfigError(
                f"mlp_pattern={self.mlp_pattern!r} asks for expert layers (E) but "
                "mlp_type='dense'; use mlp_type='token_routed' or 'moe'"
            )
        per_layer = self.num_experts_per_layer
        if per_layer is not None:
            if len(per_layer) != depth:
                raise ConfigError(
                    f"num_experts_per_layer={shorten(per_layer)} must list one count per layer "
                    f"(num_hidden_layers={depth})"
                )
            for layer, count in enumerate(per_layer):
                kind = mlp_letters[layer % len(mlp_letters)]
                if kind == "D" and count != 0:
                    raise ConfigError(
                        f"num_experts_per_layer[{layer}]={count} but layer {layer} is dense "
                        f"(mlp letter D of mlp_pattern={self.mlp_pattern!r}): use 0"
                    )
                if kind != "D" and count < 1:
                    raise ConfigError(
                        f"num_experts_per_layer[{layer}]={count!r} must be >= 1 on an expert "
                        f"layer (mlp letter {kind} of mlp_pattern={self.mlp_pattern!r})"
                    )
                if self._mlp_kind(kind) == "T" and self.intermediate_size % count:
                    raise ConfigError(
                        f"num_experts_per_layer[{layer}]={count} must divide "
                        f"intermediate_size={self.intermediate_size}"
                    )

    def _validate_moe(self) -> None:
        if self.mlp_type == "moe" and self.moe_router == "topk":
            # the expert layers' counts (dense layers list 0; none listed: num_experts each)
            counts = [c for c in self.num_experts_per_layer or [] if c]
            smallest = min(counts, default=self.num_experts)
            source = "num_experts_per_layer" if counts else "num_experts"
            if self.moe_top_k > smallest:
                raise ConfigError(
                    f"moe_top_k={self.moe_top_k} exceeds the number of experts ({smallest}) "
                    f"of an expert layer ({source})"
                )

    # --- serialisation -----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """From plain data (config.json, a preset with overrides); any bad field or value
        raises ConfigError naming it."""
        return cls(**check_mapping(cls, data, FIELD_RULES, what="ModelConfig"))

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
    "mlp_type": one_of(MLP_TYPES),
    "routing": one_of(ROUTINGS),
    "moe_router": one_of(MOE_ROUTERS),
    "moe_score": one_of(MOE_SCORES),
    "moe_balance": one_of(MOE_BALANCES),
    "moe_aux_loss_coef": at_least(0),
    "moe_bias_update_rate": at_least(0),
    "moe_load_ema_decay": within(0, 1, high_open=True),
    "moe_capacity_factor": at_least(0, strict=True),
    "moe_num_shared": at_least(0),
    "shared_expert_ratio": at_least(0, strict=True),
    "mu_update": one_of(MU_UPDATES),
    "mu_clamp": at_least(0, strict=True),
    "mu_ema_alpha": within(0, 1),
    "mu_ema_beta": within(0, 1),
    "activation_clamp": at_least(0, strict=True),
}


# Presets are data: overrides of the dataclass defaults (which are the 187M model).
_NEXUS: dict[str, Any] = dict(
    mlp_type="moe", mlp_pattern="DE", moe_router="topk", moe_top_k=2, moe_capacity_factor=1.25,
    moe_num_shared=1, shared_expert_ratio=0.5, moe_balance="aux_free", use_mu_guidance=False,
    max_position_embeddings=4096,
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
    "nexus-tiny": dict(_NEXUS, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                       num_key_value_heads=4, intermediate_size=1024, mixer_pattern="AMMM",
                       num_experts=4),
    "nexus-small": dict(_NEXUS, hidden_size=512, num_hidden_layers=6, num_attention_heads=8,
                        num_key_value_heads=8, intermediate_size=2048, mixer_pattern="AMMMMM",
                        num_experts=8, num_experts_per_layer=[0, 8, 0, 8, 0, 16]),
    "nexus-base": dict(_NEXUS, hidden_size=1024, num_hidden_layers=12, num_attention_heads=16,
                       num_key_value_heads=16, intermediate_size=4096, mixer_pattern="AMMMMM",
                       num_experts=16),
    "nexus-large": dict(_NEXUS, hidden_size=2048, num_hidden_layers=24, num_attention_heads=16,
                        num_key_value_heads=16, intermediate_size=8192,
                        mixer_pattern="AMMMMMMM", num_experts=32),
    # Jamba layout at CPU size: one attention layer per eight, MoE every other layer.
    "jamba-tiny": dict(_NEXUS, vocab_size=8192, hidden_size=128, num_hidden_layers=8,
                       num_attention_heads=4, num_key_value_heads=2, intermediate_size=512,
                       mixer_pattern="AMMMMMMM", num_experts=4, moe_num_shared=0,
                       max_position_embeddings=512),
    # CORVUS-CORAX's MLA case: d = 4096 with a 512-wide cached latent (d / d_c = 8).
    "corvus-mla": dict(
        hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
        intermediate_size=11008, mlp_type="dense", use_mu_guidance=False, mixer_pattern="L",
        mla_kv_rank=512, mla_rope_dim=64, mla_q_rank=1536, max_position_embeddings=4096,
    ),
    # CPU-sized model for tests and the demo.
    "tiny": dict(
        vocab_size=8192, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=1024, max_position_embeddings=512,
    ),
}
