import json
import math

import pytest
import torch

from hybridlm import PRESETS, HybridLM, ModelConfig


def test_json_round_trip(tmp_path):
    cfg = ModelConfig.from_preset("tiny", tr_routing="zipf", activation_clamp=100.0)
    path = tmp_path / "c.json"
    cfg.to_json(path)
    assert ModelConfig.from_json(path) == cfg
    assert ModelConfig.from_json(cfg.to_json()) == cfg
    assert json.loads(cfg.to_json())["tr_routing"] == "zipf"


def test_preset_overrides_apply():
    cfg = ModelConfig.from_preset("complexity-deep-187m", num_hidden_layers=2)
    assert cfg.num_hidden_layers == 2 and cfg.hidden_size == 768


def test_187m_parameter_count():
    cfg = ModelConfig.from_preset("complexity-deep-187m")
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads) == (768, 18, 12)
    assert (cfg.num_key_value_heads, cfg.num_experts, cfg.vocab_size) == (4, 4, 32000)
    with torch.device("meta"):
        model = HybridLM(cfg)
    # embed 24.58M + 18 x (qkv/o 1.57M + mu->qkv 0.98M + 4 experts 4.72M + shared 1.18M
    # + mu_proj 0.59M) - the last layer's unused mu_proj; exactly:
    h, kv, e_w = 768, 256, 512
    per_layer = (h * (h + 2 * kv) * 2 + h * h) + 4 * 3 * h * e_w + 3 * h * e_w + 2 * h + 2 * 64
    mu = h * h + h
    expected = 32000 * h + 18 * per_layer + 17 * mu + h + h  # + mu_init + final norm
    assert model.num_parameters() == expected
    assert abs(expected - 187e6) / 187e6 < 0.005
    # one routed expert of four is active per token
    assert model.num_parameters(active=True) == expected - 18 * 3 * 3 * h * e_w


def test_1_5b_preset_matches_table_3():
    cfg = ModelConfig.from_preset("complexity-deep-1.5b")
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads) == (24, 2048, 16)
    assert (cfg.num_key_value_heads, cfg.intermediate_size, cfg.num_experts) == (4, 8192, 4)
    assert (cfg.vocab_size, cfg.max_position_embeddings) == (32000, 4096)
    with torch.device("meta"):
        bare = HybridLM(ModelConfig.from_preset(
            "complexity-deep-1.5b", mu_guidance=False, num_shared_experts=0))
    # The paper's 1.5B total is met by attention + routed experts alone.
    assert abs(bare.num_parameters() - 1.5e9) / 1.5e9 < 0.02


@pytest.mark.parametrize(
    "overrides, words",
    [
        (dict(hidden_size=100, num_attention_heads=12),
         ["num_attention_heads=12", "hidden_size=100"]),
        (dict(num_key_value_heads=5), ["num_key_value_heads=5", "num_attention_heads=12"]),
        (dict(num_experts=0), ["num_experts=0", ">= 1"]),
        (dict(mlp_pattern="S"), ["mlp_pattern='S'", "unknown letters ['S']", "'T'"]),
        (dict(tr_routing="hash"), ["tr_routing", "'hash'", "zipf"]),
        (dict(num_experts=3), ["num_experts=3", "intermediate_size=2048"]),
        (dict(vocab_size=0), ["vocab_size=0"]),
        (dict(activation_clamp=-1.0), ["activation_clamp=-1.0"]),
        (dict(mu_update="sum"), ["mu_update", "'sum'"]),
    ],
)
def test_invalid_config_names_field_and_value(overrides, words):
    with pytest.raises(ValueError) as err:
        ModelConfig(**overrides)
    for word in words:
        assert word in str(err.value)


def test_unknown_preset_lists_allowed():
    with pytest.raises(ValueError, match="unknown preset 'nope'.*tiny"):
        ModelConfig.from_preset("nope")


def test_unknown_field_is_refused():
    with pytest.raises(ValueError, match="hiden_size"):
        ModelConfig.from_dict({"hiden_size": 3})


# --- Independent parameter counts -------------------------------------------------------------
# Written from the papers' definitions and the config fields' documented meaning, not from the
# modules: a module that grows or loses a weight, or a config field whose meaning drifts, makes
# the model's count differ from these.


def _swiglu(hidden: int, width: int) -> int:
    return 3 * hidden * width  # W_gate, W_up (H x I) and W_down (I x H), no biases


def _gqa_attention(c: ModelConfig, reads_mu: bool) -> int:
    """Grouped-query attention with QK-norm; mu guidance (Complexity-Deep eq. 7-10) adds
    W_mu^{q,k,v}, as large as W^{q,k,v}, reading mu_prev."""
    q_width = c.num_attention_heads * c.head_dim
    kv_width = c.num_key_value_heads * c.head_dim
    qkv = c.hidden_size * (q_width + 2 * kv_width) * (2 if reads_mu else 1)
    qk_norm = 2 * c.head_dim if c.attn_qk_norm else 0  # one RMSNorm gain over head_dim each
    return qkv + q_width * c.hidden_size + qk_norm


def _mla(c: ModelConfig) -> int:
    """DeepSeek-V2 section 2.1: W_DKV (H -> r), RMSNorm on c_kv, W_UK and W_UV (r -> nh d), the
    shared RoPE key W_KR (H -> dr); the query full-rank (H -> nh (d + dr)) or through a latent
    (W_DQ: H -> rq, RMSNorm on c_q, W_UQ: rq -> nh d, W_QR: rq -> nh dr); W_O (nh d -> H)."""
    h, nh, d = c.hidden_size, c.num_attention_heads, c.head_dim
    r, dr, rq = c.mla_kv_rank, c.mla_rope_dim, c.mla_q_rank
    kv = h * r + r + 2 * r * nh * d + h * dr
    query = h * nh * (d + dr) if rq is None else h * rq + rq + rq * nh * d + rq * nh * dr
    return kv + query + nh * d * h


def _mamba(c: ModelConfig) -> int:
    """Mamba block (Gu & Dao 2023, Fig. 3 / mamba_simple): in_proj H -> 2 Din (x and gate z),
    depthwise conv (K taps + bias per channel), x_proj Din -> R + 2N (delta, B, C), dt_proj
    R -> Din with bias, A (Din x N), D (Din), out_proj Din -> H."""
    h, din, n = c.hidden_size, c.mamba_expand * c.hidden_size, c.mamba_d_state
    k, rank = c.mamba_d_conv, c.mamba_dt_rank or math.ceil(c.hidden_size / 16)
    return 2 * h * din + din * (k + 1) + din * (rank + 2 * n) + (rank * din + din) + (
        din * n + din) + din * h


def _expert_mlp(c: ModelConfig, letter: str, experts: int) -> tuple[int, float]:
    """One expert layer (mlp letter T or E) -> (parameters, routed-expert parameters one token
    leaves unused)."""
    h = c.hidden_size
    if letter == "T":
        # intermediate_size is the total width, split evenly over this layer's experts.
        width = c.intermediate_size // experts
        used = 1  # the routing table sends each token id to exactly one expert
        router = 0  # the table is fixed, not learned
    else:
        width = c.moe_intermediate_size or c.intermediate_size
        router = h * experts  # gate H -> E, no bias (the balancing bias is not a weight)
        if c.moe_router == "topk":
            used = c.moe_top_k
        else:  # expert choice: E experts x C = N f / E tokens each = f experts per token
            used = min(experts, c.moe_ec_capacity_factor)
    # num_shared_experts of their own width (None: one routed expert's) on T and E layers
    # alike: as one SwiGLU they are the same count (DeepSeekMoE's shared experts are
    # ordinary experts every token passes through).
    shared = c.num_shared_experts * (c.shared_expert_intermediate_size or width)
    routed = experts * _swiglu(h, width)
    return router + routed + _swiglu(h, shared), (experts - used) * _swiglu(h, width)


def hand_parameter_count(c: ModelConfig) -> tuple[int, int]:
    """(total, active) parameters of a config, from the definitions above."""
    h = c.hidden_size
    mixers = [c.mixer_pattern[i % len(c.mixer_pattern)] for i in range(c.num_hidden_layers)]
    reads_mu = [c.mu_guidance and m == "A" for m in mixers]
    total = c.vocab_size * h * (1 if c.tie_word_embeddings else 2)  # embedding (+ lm_head)
    total += h  # final RMSNorm
    total += h if any(reads_mu) else 0  # mu_init: the mu the first attention layer reads
    unused = 0.0
    for layer, mixer in enumerate(mixers):
        total += 2 * h  # RMSNorms before the mixer and the MLP
        if mixer == "A":
            total += _gqa_attention(c, reads_mu[layer])
        elif mixer == "L":
            total += _mla(c)
        else:
            total += _mamba(c)
        experts = c.experts_in_layer(layer)
        if experts == 0:
            total += _swiglu(h, c.intermediate_size)
        else:
            params, idle = _expert_mlp(c, c.layer_mlps[layer], experts)
            total, unused = total + params, unused + idle
        # mu update (clamp: W_mu h + mu_param; ema: W_mu h) only where a later layer reads mu
        if reads_mu[layer] and any(reads_mu[layer + 1:]):
            total += h * h + (h if c.mu_update == "clamp" else 0)
        if c.pid_scaler:
            total += 3 + 1  # Wc over [|h|, |mu|, |mu - mu_prev|] and bc
    return total, total - round(unused)


def _counts_on_meta(cfg: ModelConfig) -> tuple[int, int]:
    with torch.device("meta"):
        model = HybridLM(cfg)
    return model.num_parameters(), model.num_parameters(active=True)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_count_equals_the_hand_formula(name):
    from hybridlm.cli import preset_parameter_counts

    cfg = ModelConfig.from_preset(name)
    expected = hand_parameter_count(cfg)
    assert _counts_on_meta(cfg) == expected
    assert preset_parameter_counts(name) == expected  # what `hybridlm presets` prints
    total, active = expected
    assert 0 < active <= total


# Branches no preset takes: untied head, ema mu, scaler, full-rank MLA query, expert choice
# with a fractional capacity, per-layer token-routed experts with a wider shared expert, ...
FORMULA_VARIANTS = [
    ("tiny", dict(tie_word_embeddings=False, pid_scaler=True, mu_update="ema")),
    ("tiny", dict(attn_qk_norm=False, num_shared_experts=0, mixer_pattern="AM")),
    ("tiny", dict(mlp_pattern="DT", num_experts_per_layer=[0, 2, 0, 8],
                  shared_expert_intermediate_size=96)),
    ("tiny", dict(mixer_pattern="LAMA", mla_q_rank=None, mla_kv_rank=64, mla_rope_dim=16)),
    ("tiny", dict(mlp_pattern="E", moe_router="expert_choice", moe_ec_capacity_factor=1.5,
                  moe_intermediate_size=192, num_shared_experts=2,
                  shared_expert_intermediate_size=144)),
    ("tiny", dict(mlp_pattern="TEDE", num_experts_per_layer=[2, 8, 0, 4], moe_top_k=4,
                  num_shared_experts=3)),
    ("jamba-tiny", dict(mamba_dt_rank=5, mamba_expand=3, mamba_d_conv=3, moe_top_k=3)),
    ("corvus-mla", dict(num_hidden_layers=2, mlp_pattern="E", moe_top_k=1, num_experts=3)),
]


@pytest.mark.parametrize(
    "name, overrides", FORMULA_VARIANTS, ids=[f"{n}:{','.join(o)}" for n, o in FORMULA_VARIANTS]
)
def test_hand_formula_covers_the_branches_no_preset_takes(name, overrides):
    cfg = ModelConfig.from_preset(name, **overrides)
    assert _counts_on_meta(cfg) == hand_parameter_count(cfg)


# (total, active) parameters of every preset, recorded with the release before the config
# fields were renamed: the renamed presets build the same models.
PRESET_COUNTS = {
    "complexity-deep-187m": (186822144, 123121152),
    "complexity-deep-1.5b": (2074763264, 1168793600),
    "nexus-tiny": (18422656, 15276928),
    "nexus-small": (140748416, 58959488),
    "nexus-base": (1429148928, 372184320),
    "nexus-large": (20905310976, 2785917696),
    "jamba-tiny": (5849536, 4276672),
    "corvus-mla": (5709828096, 5709828096),
    "tiny": (7540480, 5181184),
}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_build_the_models_they_built_before_the_rename(name):
    assert _counts_on_meta(ModelConfig.from_preset(name)) == PRESET_COUNTS[name]
