"""Hybrid stacks: every mixer x MLP combination, mixed layouts, caches, presets, balancing."""

import math

import pytest
import torch

from hybridlm import PRESETS, HybridLM, ModelConfig

MIXERS = ["A", "L", "M"]
MLPS = [
    {"mlp_pattern": "D"},
    {"mlp_pattern": "T"},
    {"mlp_pattern": "E", "moe_router": "topk", "moe_top_k": 2},
    {"mlp_pattern": "E", "moe_router": "expert_choice", "moe_ec_capacity_factor": 1.0},
]


def small(**overrides) -> ModelConfig:
    base = dict(
        vocab_size=61, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=64, num_experts=4, max_position_embeddings=64,
        mla_kv_rank=16, mla_rope_dim=4, mamba_d_state=4, mamba_chunk_size=8,
    )
    return ModelConfig(**{**base, **overrides})


# Key recall: each sequence opens with a key (one of RECALL_KEYS ids), random distractor ids
# follow, and the logits at every position must name the key. From RECALL_FROM on, the key
# lies further back than two stacked Mamba convs reach (2 x 3 tokens), so only the mixer can
# bring it there. Sequences are fresh every step and the loss is measured on a held-out batch:
# a token-local model (the mixer returning zeros) can do no better there than guessing,
# log(RECALL_KEYS) nats. Expert choice sees the whole batch (it is not causal), but which
# tokens an expert takes says too little to give a key away; the zeroed control shows it.
RECALL_KEYS, RECALL_LEN, RECALL_FROM = 8, 16, 9


def _key_recall_batch(
    batch: int, generator: torch.Generator, first: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """-> ids (B, T), labels (B, T): label t + 1 (the model shifts) is the key for the logits
    at t >= first, -100 before."""
    ids = torch.randint(RECALL_KEYS, 61, (batch, RECALL_LEN), generator=generator)
    ids[:, 0] = torch.randint(0, RECALL_KEYS, (batch,), generator=generator)
    labels = ids[:, :1].expand(-1, RECALL_LEN).clone()
    labels[:, : first + 1] = -100
    return ids, labels


def _recall_model(mixer: str, mlp: dict) -> HybridLM:
    # A wide init and Mamba expand 4: at the default init (0.02) Mamba's B and C start so
    # small that their product sits on a plateau for hundreds of steps.
    torch.manual_seed(0)
    return HybridLM(small(mixer_pattern=mixer, initializer_range=0.3, mamba_expand=4, **mlp))


def _held_out_recall_loss_after_training(model: HybridLM, steps: int = 60) -> float:
    """Train on fresh key-recall batches (every position from 1 on is scored, so near keys,
    which the conv alone reaches, give the mixer a gradient early); return the held-out loss
    at positions >= RECALL_FROM in eval mode."""
    opt = torch.optim.AdamW(model.parameters(), lr=2e-2)
    generator = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        ids, labels = _key_recall_batch(16, generator)
        loss = model(ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        model.balance_step()
    model.eval()
    ids, labels = _key_recall_batch(128, torch.Generator().manual_seed(1), first=RECALL_FROM)
    with torch.no_grad():
        return model(ids, labels=labels).aux["lm_loss"].item()


@pytest.mark.parametrize("mixer", MIXERS)
@pytest.mark.parametrize("mlp", MLPS, ids=lambda m: m["mlp_pattern"] + m.get("moe_router", ""))
def test_every_mixer_and_mlp_learns_to_recall_a_distant_key(mixer, mlp):
    loss = _held_out_recall_loss_after_training(_recall_model(mixer, mlp))
    assert loss < 0.5 * math.log(RECALL_KEYS), loss  # guessing: log(8) = 2.08 nats


@pytest.mark.parametrize("mlp", MLPS, ids=lambda m: m["mlp_pattern"] + m.get("moe_router", ""))
def test_key_recall_fails_with_the_mixer_returning_zeros(mlp, monkeypatch):
    # The breakage the test above must catch: an MLP alone (token-local, or expert choice
    # seeing the batch) can't name a key it never sees. "A" keeps mu flowing between layers.
    model = _recall_model("A", mlp)
    for block in model.layers:
        monkeypatch.setattr(block.mixer, "forward", lambda x, **_: torch.zeros_like(x))
    loss = _held_out_recall_loss_after_training(model)
    assert loss > 0.9 * math.log(RECALL_KEYS), loss


STACKS = [
    dict(mixer_pattern="A"),
    dict(mixer_pattern="L"),
    dict(mixer_pattern="L", mla_absorb=True),
    dict(mixer_pattern="M"),
    dict(mixer_pattern="AMLM", num_hidden_layers=4, mlp_pattern="DE"),
    dict(mixer_pattern="MA", num_hidden_layers=4, pid_scaler=True),
    dict(mixer_pattern="AM", num_hidden_layers=4, mlp_pattern="E", moe_shortcut=True,
         num_shared_experts=1, shared_expert_intermediate_size=32),
]


PARITY_ATOL = 1e-4  # cached vs full logits; measured float error <= 1e-5 at logit scale ~6
MIXED = dict(mixer_pattern="AMLM", num_hidden_layers=4, mlp_pattern="E")
CHUNKS = (4, 1, 3, 1, 2)  # a prefill, single decode steps and multi-token continuations


def greedy_by_full_forwards(model: HybridLM, prompt: torch.Tensor, steps: int) -> torch.Tensor:
    """The greedy continuation recomputed from scratch at every step (no cache): (B, T0+steps)."""
    seq = prompt
    for _ in range(steps):
        seq = torch.cat([seq, model(seq).logits[:, -1].argmax(-1, keepdim=True)], 1)
    return seq


def cached_logits(model: HybridLM, ids: torch.Tensor, chunks=CHUNKS) -> torch.Tensor:
    """Logits (B, sum(chunks), V) of ids fed through one cache, chunk after chunk."""
    cache = model.new_cache(ids.shape[0], ids.shape[1])
    parts, start = [], 0
    for n in chunks:
        parts.append(model(ids[:, start:start + n], cache=cache).logits)
        start += n
    return torch.cat(parts, 1)


def random_ids(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 61, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("stack", STACKS, ids=lambda s: str(sorted(s.items())))
def test_cached_greedy_equals_step_by_step_full_forwards(make_history_model, stack):
    model = make_history_model(small(**stack))
    prompt = random_ids((2, 5))
    cached = model.generate(prompt, max_new_tokens=10, do_sample=False)
    assert torch.equal(cached, greedy_by_full_forwards(model, prompt, 10))
    # a continuation of one repeated token would match whatever the cache held
    assert min(len(set(row.tolist())) for row in cached[:, 5:]) >= 4, cached


@pytest.mark.parametrize("absorb", [False, True], ids=["plain", "absorbed"])
def test_mixed_stack_cached_logits_match_full_forward(make_history_model, absorb):
    model = make_history_model(small(**MIXED, mla_absorb=absorb))
    ids = random_ids((2, sum(CHUNKS)))
    with torch.no_grad():
        full = model(ids).logits
        torch.testing.assert_close(cached_logits(model, ids), full, atol=PARITY_ATOL, rtol=0)
        # the tolerance is tiny next to what the history contributes: each token alone
        # gives logits several units away
        alone = model(ids.reshape(-1, 1)).logits.view_as(full)
    assert (alone - full)[:, 1:].abs().amax() > 1000 * PARITY_ATOL


@pytest.mark.parametrize("breakage, stack", [
    pytest.param("kv_cache_forgets", MIXED, id="kv_cache_forgets"),
    pytest.param("mla_cache_forgets", MIXED, id="mla_cache_forgets"),
    pytest.param("mla_cache_forgets", {**MIXED, "mla_absorb": True},
                 id="absorbed_mla_cache_forgets"),
    pytest.param("mamba_ssm_state_dropped", MIXED, id="mamba_ssm_state_dropped"),
    pytest.param("mamba_conv_state_dropped", MIXED, id="mamba_conv_state_dropped"),
    pytest.param("positions_restart_at_0", MIXED, id="positions_restart_at_0"),
    pytest.param("positions_restart_at_0", dict(mixer_pattern="L"),  # MLA's RoPE key alone
                 id="mla_positions_restart_at_0"),
])
def test_a_cache_that_loses_the_history_fails_the_logit_parity(
    make_history_model, break_cache, breakage, stack
):
    model = make_history_model(small(**stack))
    ids = random_ids((2, sum(CHUNKS)))
    with torch.no_grad():
        full = model(ids).logits  # no cache: unaffected by the breakage
        break_cache(breakage)
        error = (cached_logits(model, ids) - full).abs().amax()
    assert error > 100 * PARITY_ATOL, f"{breakage}: cached logits off by only {error:.2e}"


def test_mu_flows_between_attention_layers_across_mamba_layers():
    model = HybridLM(small(mixer_pattern="AMMA", num_hidden_layers=4))
    producers = [b.mu_update is not None for b in model.layers]
    assert producers == [True, False, False, False]  # layer 0 feeds layer 3; nothing reads 3's
    assert model.layers[0].mixer.use_mu and model.layers[3].mixer.use_mu
    ids = torch.randint(0, 61, (2, 8))
    model(ids, labels=ids).loss.backward()
    assert model.layers[0].mu_update.mu_proj.weight.grad.abs().sum() > 0
    assert model.mu_init.grad.abs().sum() > 0
    # no mu consumer at all: no mu parameters
    mamba_only = HybridLM(small(mixer_pattern="M"))
    assert mamba_only.mu_init is None and all(b.mu_update is None for b in mamba_only.layers)


def test_mla_cache_bytes_per_token():
    model = HybridLM(small(mixer_pattern="L", num_hidden_layers=3))
    for dtype in (torch.float32, torch.bfloat16):
        size = torch.tensor([], dtype=dtype).element_size()
        assert model.kv_cache_bytes_per_token(dtype) == 3 * (16 + 4) * size
        assert model.cache_fixed_bytes(dtype) == 0


def test_cache_bytes_gqa_mamba_and_mixed():
    gqa = HybridLM(small(mixer_pattern="A"))
    assert gqa.kv_cache_bytes_per_token(torch.float32) == 2 * 2 * (2 * 8) * 4  # L*2(K,V)*nkv*D
    mamba = HybridLM(small(mixer_pattern="M"))
    assert mamba.kv_cache_bytes_per_token(torch.float32) == 0
    assert mamba.cache_fixed_bytes(torch.float32) > 0
    mixed = HybridLM(small(mixer_pattern="AM"))
    assert mixed.kv_cache_bytes_per_token(torch.float32) == 2 * (2 * 8) * 4


def test_cache_bytes_match_what_generate_allocates():
    model = HybridLM(small(mixer_pattern="LM")).eval()
    allocated = []
    original = model.new_cache
    model.new_cache = lambda *a, **k: allocated.append(original(*a, **k)) or allocated[-1]
    model.generate(torch.randint(0, 61, (1, 3)), max_new_tokens=4, do_sample=False)
    per_token = model.kv_cache_bytes_per_token(torch.float32)
    assert allocated[0].nbytes() == 7 * per_token + model.cache_fixed_bytes(torch.float32)


def test_expert_choice_refuses_generation():
    model = HybridLM(small(mlp_pattern="E", moe_router="expert_choice")).eval()
    assert not model.is_causal
    with pytest.raises(ValueError, match="expert_choice.*not causal"):
        model.generate(torch.randint(0, 61, (1, 3)), max_new_tokens=2)
    with pytest.raises(ValueError, match="not causal"):
        model(torch.randint(0, 61, (1, 3)), cache=model.new_cache(1, 4))


def test_aux_loss_is_added_to_the_model_loss():
    torch.manual_seed(0)
    model = HybridLM(small(mlp_pattern="E", moe_balance="aux_loss", moe_aux_loss_coef=0.5))
    ids = torch.randint(0, 61, (2, 10))
    out = model(ids, labels=ids)
    assert out.aux["aux_loss"] > 0
    torch.testing.assert_close(out.loss, out.aux["lm_loss"] + out.aux["aux_loss"])
    assert len(out.aux["expert_counts"]) == 2 and len(out.aux["router_entropy"]) == 2


def _expected_bias_step(balance: str, load: torch.Tensor, rate: float,
                        decay: float) -> torch.Tensor:
    """The first bias step from zero bias (and load_ema = 1) for a summed load (E,):
    aux_free +gamma * sign(mean - load); ema -rate * (1 - decay) * (load / mean - 1)."""
    mean = load.mean()
    if balance == "aux_free":
        return rate * torch.sign(mean - load)
    return -rate * (1 - decay) * (load / mean - 1)


@pytest.mark.parametrize("balance", ["aux_free", "ema"])
def test_balance_step_moves_the_bias_by_the_load_summed_over_ranks(balance):
    """The fake reduce adds another rank's load that reverses which experts are busy
    (summed = max(local) * 2 - local), so the bias must move the opposite way from what the
    local load alone would give: a balance step that drops the reduced load is noticed."""
    rate, decay = 0.1, 0.9
    torch.manual_seed(0)
    model = HybridLM(small(mlp_pattern="E", moe_balance=balance, moe_aux_free_rate=rate,
                           moe_ema_rate=rate,
                           moe_ema_decay=decay)).train()
    with torch.no_grad():
        for block in model.layers:
            block.mlp.router.gate.weight[0].fill_(1.0)  # skew: expert 0 wins often
        model(torch.randint(0, 61, (4, 16)))
    local = [block.mlp.pending_load().clone() for block in model.layers]  # (E,) each
    summed = [2 * load.max() - load for load in local]
    assert all(len(set(load.tolist())) > 2 for load in local)  # busy and idle experts

    reduced = []

    def add_other_rank(load: torch.Tensor) -> None:  # in place, as all_reduce
        other = 2 * load.max() - 2 * load  # (E,) >= 0: the other rank's load
        reduced.append(load.clone())
        load.add_(other)

    model.balance_step(reduce=add_other_rank)
    assert len(reduced) == len(model.layers)  # one reduce per MoE layer, on its local load
    for block, seen, mine, total in zip(model.layers, reduced, local, summed, strict=True):
        torch.testing.assert_close(seen, mine)
        bias = block.mlp.router.expert_bias
        expected = _expected_bias_step(balance, total, rate, decay)
        torch.testing.assert_close(bias, expected, rtol=1e-6, atol=1e-7)
        from_local_alone = _expected_bias_step(balance, mine, rate, decay)
        assert torch.sign(from_local_alone).eq(-torch.sign(bias)).all()
        assert block.mlp.pending_load().sum() == 0  # reset after the update


def test_per_layer_expert_counts_and_patterns():
    cfg = ModelConfig.from_preset("nexus-small")
    assert cfg.layer_mixers == ["A", "M", "M", "M", "M", "M"]
    assert cfg.layer_mlps == ["D", "E"] * 3
    with torch.device("meta"):
        model = HybridLM(cfg)
    experts = [getattr(b.mlp, "experts", None) for b in model.layers]
    assert [e.num_experts if e is not None else 0 for e in experts] == [0, 8, 0, 8, 0, 16]
    jamba = ModelConfig.from_preset("jamba-tiny")
    assert jamba.layer_mixers == list("AMMMMMMM") and jamba.layer_mlps == list("DEDEDEDE")


def test_preset_counts_are_the_documented_ones():
    from hybridlm.cli import preset_parameter_counts

    readme = (__import__("pathlib").Path(__file__).parents[1] / "README.md").read_text()
    for name in PRESETS:
        total, active = preset_parameter_counts(name)
        assert f"{total:,}" in readme and f"{active:,}" in readme, name


@pytest.mark.parametrize("overrides, words", [
    (dict(mixer_pattern="AX"), ["mixer_pattern='AX'", "unknown letters ['X']"]),
    (dict(mlp_pattern="DQ"), ["mlp_pattern='DQ'", "['Q']"]),
    (dict(mixer_pattern="AMM"), ["mixer_pattern='AMM'", "num_hidden_layers=2"]),
    (dict(mixer_pattern=""), ["mixer_pattern=''"]),
    (dict(mlp_pattern="E", num_experts_per_layer=[4]), ["num_experts_per_layer=[4]"]),
    (dict(mlp_pattern="DE", num_experts_per_layer=[4, 4]),
     ["num_experts_per_layer[0]=4", "dense"]),
    (dict(mlp_pattern="E", moe_top_k=5), ["moe_top_k=5", "the 4 experts"]),
    (dict(mlp_pattern="E", moe_capacity_factor=0.0), ["moe_capacity_factor=0.0"]),
    (dict(mlp_pattern="E", moe_capacity_factor=-1.0), ["moe_capacity_factor=-1.0"]),
    (dict(moe_router="expert_choice", moe_capacity_factor=1.5),
     ["moe_capacity_factor=1.5", "moe_ec_capacity_factor"]),
    (dict(moe_router="hash"), ["moe_router='hash'"]),
    (dict(moe_balance="magic"), ["moe_balance='magic'"]),
    (dict(mla_rope_dim=3), ["mla_rope_dim=3"]),
    (dict(mamba_d_state=0), ["mamba_d_state=0"]),
])
def test_bad_layout_and_moe_values(overrides, words):
    with pytest.raises(ValueError) as err:
        small(**overrides)
    for word in words:
        assert word in str(err.value)


def _skewed_moe_model(balance: str) -> HybridLM:
    torch.manual_seed(0)
    model = HybridLM(small(mlp_pattern="E", moe_score="sigmoid", moe_top_k=1,
                           moe_balance=balance)).train()  # default gamma 0.001
    with torch.no_grad():
        for block in model.layers:
            block.mlp.router.gate.weight[0] += 0.3  # expert 0 wins most tokens
            block.mlp.router.gate.weight[1] += 0.2
    return model


def _load_ratio(model: HybridLM) -> float:
    with torch.no_grad():
        model.eval()
        ids = torch.randint(0, 61, (64, 32), generator=torch.Generator().manual_seed(123))
        counts = model(ids).aux["expert_counts"][0].float()
        model.train()
    return float(counts.max() / counts.min().clamp(min=1))


def test_aux_free_balance_step_evens_a_skewed_router_and_the_control_stays_skewed():
    balanced, control = _skewed_moe_model("aux_free"), _skewed_moe_model("none")
    assert _load_ratio(balanced) > 3 and _load_ratio(control) > 3
    for _ in range(300):
        ids = torch.randint(0, 61, (4, 16))
        with torch.no_grad():
            balanced(ids)
            control(ids)
        balanced.balance_step()
        control.balance_step()
    assert _load_ratio(balanced) < 1.5
    assert _load_ratio(control) > 3
