"""ModelConfig: one flat dataclass that describes every hybridlm model, plus named presets.

Variants are chosen by strings (never classes) so a config is always plain JSON. Field names
follow the source documents (`hidden_size`, `num_hidden_layers`, `mlp_type`, ...). Every bad
value raises `ValueError` naming the field, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MLP_TYPES = ("dense", "token_routed", "moe")
ROUTINGS = ("modulo", "zipf")
MU_UPDATES = ("clamp", "ema")
MIXER_LETTERS = {"A": "GQA attention (mu-guided when use_mu_guidance)", "L": "MLA", "M": "Mamba"}
MLP_LETTERS = {"D": "dense SwiGLU", "E": "expert MLP of kind mlp_type"}
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
    mixer_pattern: str = "A"  # A = GQA attention, L = MLA, M = Mamba; "AMMMMMMM" = Jamba 1:7
    mlp_pattern: str | None = None  # D = dense, E = expert MLP (mlp_type); None: all E (all D
    #                                 when mlp_type="dense"); "DE" = experts every other layer
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
        """MLP letter of each layer ("D" or "E")."""
        default = "D" if self.mlp_type == "dense" else "E"
        return _tile(self.mlp_pattern or default, self.num_hidden_layers)

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
        _positive(self, "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "intermediate_size", "max_position_embeddings")
        _choice(self, "mlp_type", MLP_TYPES)
        _choice(self, "routing", ROUTINGS)
        _choice(self, "mu_update", MU_UPDATES)
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} must divide "
                f"hidden_size={self.hidden_size}"
            )
        if self.head_dim % 2:
            raise ValueError(
                f"head_dim = hidden_size/num_attention_heads = {self.head_dim} must be even "
                "for RoPE"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_key_value_heads={self.num_key_value_heads} must divide "
                f"num_attention_heads={self.num_attention_heads}"
            )
        if self.num_experts < 1:
            raise ValueError(f"num_experts={self.num_experts} must be >= 1")
        if self.mlp_type == "token_routed" and self.intermediate_size % self.num_experts:
            raise ValueError(
                f"num_experts={self.num_experts} must divide intermediate_size="
                f"{self.intermediate_size} (token_routed splits the MLP width over the experts)"
            )
        if self.shared_expert_intermediate_size is not None:
            _positive(self, "shared_expert_intermediate_size")
        self._validate_layout()
        self._validate_moe()
        _positive(self, "mla_kv_rank", "mla_rope_dim", "mamba_d_state", "mamba_d_conv",
                  "mamba_expand", "mamba_chunk_size")
        if self.mla_rope_dim % 2:
            raise ValueError(f"mla_rope_dim={self.mla_rope_dim} must be even for RoPE")
        if self.mla_q_rank is not None:
            _positive(self, "mla_q_rank")
        if self.mamba_dt_rank is not None:
            _positive(self, "mamba_dt_rank")
        if self.rope_theta <= 0:
            raise ValueError(f"rope_theta={self.rope_theta} must be > 0")
        if self.mu_clamp <= 0:
            raise ValueError(f"mu_clamp={self.mu_clamp} must be > 0")
        if self.activation_clamp is not None and self.activation_clamp <= 0:
            raise ValueError(
                f"activation_clamp={self.activation_clamp} must be > 0 or None (off)"
            )

    def _validate_layout(self) -> None:
        depth = self.num_hidden_layers
        for name, letters in (("mixer_pattern", MIXER_LETTERS), ("mlp_pattern", MLP_LETTERS)):
            pattern = getattr(self, name)
            if pattern is None and name == "mlp_pattern":
                continue
            if not isinstance(pattern, str) or not pattern:
                raise ValueError(f"{name}={pattern!r} must be a non-empty string of {letters}")
            unknown = sorted(set(pattern) - set(letters))
            if unknown:
                raise ValueError(
                    f"{name}={pattern!r} has unknown letters {unknown}; allowed: {letters}"
                )
            if depth % len(pattern):
                raise ValueError(
                    f"{name}={pattern!r} (length {len(pattern)}) does not tile "
                    f"num_hidden_layers={depth}: the length must divide the depth"
                )
        if self.mlp_type == "dense" and "E" in self.layer_mlps:
            raise ValueError(
                f"mlp_pattern={self.mlp_pattern!r} asks for expert layers (E) but "
                "mlp_type='dense'; use mlp_type='token_routed' or 'moe'"
            )
        per_layer = self.num_experts_per_layer
        if per_layer is not None:
            if not isinstance(per_layer, list | tuple) or len(per_layer) != depth:
                raise ValueError(
                    f"num_experts_per_layer={per_layer!r} must list one count per layer "
                    f"(num_hidden_layers={depth})"
                )
            for layer, (count, kind) in enumerate(zip(per_layer, self.layer_mlps, strict=True)):
                if kind == "D" and count != 0:
                    raise ValueError(
                        f"num_experts_per_layer[{layer}]={count} but layer {layer} is dense "
                        f"(mlp letter D): use 0"
                    )
                if kind == "E" and (not isinstance(count, int) or count < 1):
                    raise ValueError(
                        f"num_experts_per_layer[{layer}]={count!r} must be >= 1 on an expert "
                        "layer"
                    )
                if (kind == "E" and self.mlp_type == "token_routed"
                        and self.intermediate_size % count):
                    raise ValueError(
                        f"num_experts_per_layer[{layer}]={count} must divide "
                        f"intermediate_size={self.intermediate_size}"
                    )

    def _validate_moe(self) -> None:
        _choice(self, "moe_router", MOE_ROUTERS)
        _choice(self, "moe_score", MOE_SCORES)
        _choice(self, "moe_balance", MOE_BALANCES)
        _positive(self, "moe_top_k")
        if self.mlp_type == "moe" and self.moe_router == "topk":
            counts = [self.experts_in_layer(i) for i in range(self.num_hidden_layers)]
            smallest = min((c for c in counts if c), default=self.num_experts)
            if self.moe_top_k > smallest:
                raise ValueError(
                    f"moe_top_k={self.moe_top_k} exceeds the number of experts ({smallest}) "
                    "of an expert layer"
                )
        cf = self.moe_capacity_factor
        if cf is not None and not cf > 0:
            raise ValueError(f"moe_capacity_factor={cf} must be > 0 (or None: no capacity)")
        if self.moe_num_shared < 0:
            raise ValueError(f"moe_num_shared={self.moe_num_shared} must be >= 0")
        if not self.shared_expert_ratio > 0:
            raise ValueError(f"shared_expert_ratio={self.shared_expert_ratio} must be > 0")
        if self.moe_intermediate_size is not None:
            _positive(self, "moe_intermediate_size")
        for name in ("moe_aux_loss_coef", "moe_bias_update_rate"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0")
        if not 0 <= self.moe_load_ema_decay < 1:
            raise ValueError(f"moe_load_ema_decay={self.moe_load_ema_decay} must lie in [0, 1)")

    # --- serialisation -----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown ModelConfig fields: {unknown}")
        return cls(**data)

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
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; allowed: {sorted(PRESETS)}")
        return cls.from_dict({**PRESETS[name], **overrides})


def _tile(pattern: str, depth: int) -> list[str]:
    return [pattern[i % len(pattern)] for i in range(depth)]


def _positive(cfg: ModelConfig, *names: str) -> None:
    for name in names:
        value = getattr(cfg, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name}={value!r} must be a positive integer")


def _choice(cfg: ModelConfig, name: str, allowed: tuple[str, ...]) -> None:
    value = getattr(cfg, name)
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not one of {list(allowed)}")


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
