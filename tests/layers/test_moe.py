import math

import pytest
import torch
import torch.nn.functional as F

from hybridlm import HybridLM
from hybridlm.config import ModelConfig
from hybridlm.layers.moe import (
    ExpertChoiceRouter,
    MoEMLP,
    TopKRouter,
    _within_capacity,
    causal_routing,
)

H, E = 16, 4


def make_config(**overrides) -> ModelConfig:
    base = dict(
        vocab_size=97, hidden_size=H, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=32, mlp_pattern="E", num_experts=E,
        moe_top_k=2, num_shared_experts=0,
    )
    return ModelConfig(**{**base, **overrides})


def make_moe(seed: int = 0, num_experts: int = E, **overrides) -> MoEMLP:
    torch.manual_seed(seed)
    mlp = MoEMLP(make_config(**overrides), num_experts)
    for p in mlp.parameters():
        torch.nn.init.normal_(p, 0, 0.3)
    return mlp


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors only: thread hand-offs would cost more than the maths."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def token_choices(router, x):
    """A top-k router's Routing (nothing dropped) as expert_ids (N, k), weights (N, k), probs."""
    routing = router(x)
    return routing.expert_ids, routing.weights.view_as(routing.expert_ids), routing.probs


# --- the obvious definitions, one token at a time ---------------------------------------------
@torch.no_grad()
def reference_slots(mlp: MoEMLP, xr: torch.Tensor, cfg: ModelConfig) -> list[tuple]:
    """(token, expert, weight) slots routed by hand from the gate weight, in fp32."""
    logits = xr.float() @ mlp.router.gate.weight.float().T  # (N, E)
    probs = logits.softmax(-1) if cfg.moe_score == "softmax" else logits.sigmoid()
    n_tok, n_exp = probs.shape
    slots = []
    if cfg.moe_router == "topk":
        biased = probs + mlp.router.expert_bias
        for n in range(n_tok):
            chosen = sorted(range(n_exp), key=lambda e: -float(biased[n, e]))[: cfg.moe_top_k]
            w = torch.stack([probs[n, e] for e in chosen])
            if cfg.moe_renormalize:
                w = w / w.sum()
            slots += [(n, e, w[j]) for j, e in enumerate(chosen)]
    else:
        cap = min(max(math.ceil(n_tok * cfg.moe_ec_capacity_factor / n_exp), 1), n_tok)
        for e in range(n_exp):
            best = sorted(range(n_tok), key=lambda n: -float(probs[n, e]))[:cap]
            slots += [(n, e, probs[n, e]) for n in best]
    return slots


def per_token_loop(mlp: MoEMLP, x: torch.Tensor, xr: torch.Tensor, slots) -> torch.Tensor:
    """sum over a token's slots of weight * SwiGLU_e(xr[n]), plus the shared SwiGLU of x."""
    ex = mlp.experts
    out = torch.zeros_like(x)
    for n, e, w in slots:
        h = F.silu(xr[n] @ ex.w_gate[e]) * (xr[n] @ ex.w_up[e])
        out[n] += w * (h @ ex.w_down[e])
    if mlp.shared is not None:
        s = mlp.shared
        out += F.silu(x @ s.gate_proj.weight.T) * (x @ s.up_proj.weight.T) @ s.down_proj.weight.T
    return out


def shared_part(mlp: MoEMLP, x: torch.Tensor) -> torch.Tensor:
    return mlp.shared(x) if mlp.shared is not None else torch.zeros_like(x)


# --- 1. output equals the per-token loop ------------------------------------------------------
@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("skew", [False, True])
def test_topk_equals_per_token_loop(top_k, score, renormalize, skew):
    cfg = dict(moe_top_k=top_k, moe_score=score, moe_renormalize=renormalize,
               num_shared_experts=2 if skew else 1, shared_expert_intermediate_size=16)
    mlp = make_moe(**cfg).eval()
    if skew:  # expert 0 always chosen, expert 3 never: an expert with no tokens
        mlp.router.expert_bias.copy_(torch.tensor([10.0, 0.0, 0.0, -10.0]))
    x = torch.randn(2, 7, H)
    y, stats = mlp(x)
    flat = x.reshape(-1, H)
    slots = reference_slots(mlp, flat, make_config(**cfg))
    torch.testing.assert_close(y.reshape(-1, H), per_token_loop(mlp, flat, flat, slots),
                               atol=1e-5, rtol=1e-5)
    expected_counts = torch.bincount(torch.tensor([e for _, e, _ in slots]), minlength=E)
    assert stats["expert_counts"].tolist() == expected_counts.tolist()
    assert int(stats["dropped_tokens"]) == 0
    if skew:
        assert stats["expert_counts"][3] == 0 and stats["expert_counts"][0] == 14


def test_no_shared_expert_and_shared_width():
    assert make_moe(num_shared_experts=0).shared is None
    mlp = make_moe(num_shared_experts=3, shared_expert_intermediate_size=4,
                   moe_intermediate_size=8)
    assert mlp.shared.gate_proj.out_features == 3 * 4  # 3 shared experts of width 4
    mlp = make_moe(num_shared_experts=2, moe_intermediate_size=8)
    assert mlp.shared.gate_proj.out_features == 2 * 8  # None: as wide as a routed expert


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
@pytest.mark.parametrize("factor", [1.0, 0.5, 2.0])
def test_expert_choice_equals_per_token_loop(score, factor):
    cfg = dict(moe_router="expert_choice", moe_score=score, moe_ec_capacity_factor=factor,
               num_shared_experts=1)
    mlp = make_moe(**cfg)  # train or eval: expert choice routes the same way
    x = torch.randn(3, 5, H)
    y, stats = mlp(x)
    assert stats["expert_counts"].unique().numel() == 1  # C slots for every expert
    flat = x.reshape(-1, H)
    slots = reference_slots(mlp, flat, make_config(**cfg))
    torch.testing.assert_close(y.reshape(-1, H), per_token_loop(mlp, flat, flat, slots),
                               atol=1e-5, rtol=1e-5)
    if factor == 0.5:  # 2 tokens per expert for 15 tokens: most tokens see the shared part only
        unrouted = sorted(set(range(15)) - {n for n, _, _ in slots})
        torch.testing.assert_close(y.reshape(-1, H)[unrouted], mlp.shared(flat[unrouted]))
    assert not mlp.is_causal and make_moe().is_causal


# --- 2. expert choice capacity ----------------------------------------------------------------
@pytest.mark.parametrize("n_tok", [1, 3, 8, 13, 64])
@pytest.mark.parametrize("factor", [None, 0.3, 1.0, 1.25, 2.0, 10.0])
def test_expert_choice_takes_exactly_c_tokens_per_expert(n_tok, factor):
    torch.manual_seed(0)
    router = ExpertChoiceRouter(H, E, factor)
    cap = min(max(math.ceil(n_tok * (factor or 1.0) / E), 1), n_tok)
    assert router.capacity(n_tok) == cap
    routing = router(torch.randn(n_tok, H))
    token_idx, expert_idx, weights, probs = (
        routing.token_idx, routing.expert_idx, routing.weights, routing.probs)
    assert token_idx.shape == expert_idx.shape == weights.shape == (E * cap,)
    assert torch.bincount(expert_idx, minlength=E).tolist() == [cap] * E
    for e in range(E):  # distinct tokens, the expert's best ones
        mine = token_idx[expert_idx == e]
        assert len(set(mine.tolist())) == cap
        assert weights[expert_idx == e].min() >= probs[:, e].topk(cap).values.min()
    assert probs.dtype == torch.float32 and probs.shape == (n_tok, E)


def test_expert_choice_capacity_formula_examples():
    router = ExpertChoiceRouter(H, 4, 1.25)
    assert [router.capacity(n) for n in (1, 4, 10, 16, 100)] == [1, 2, 4, 5, 32]
    assert ExpertChoiceRouter(H, 8).capacity(12) == 2  # factor None -> 1.0: ceil(12/8)


# --- 3. token-choice capacity dropping --------------------------------------------------------
def test_capacity_drops_overflow_in_training_only():
    mlp = make_moe(moe_top_k=1, moe_capacity_factor=1.0, num_shared_experts=1).train()
    mlp.router.expert_bias.copy_(torch.tensor([0.3, 0.0, 0.0, 0.0]))  # expert 0 overloaded
    x = torch.randn(1, 16, H)
    flat = x.reshape(-1, H)
    ids = mlp.router(flat).expert_ids[:, 0]
    selected = torch.bincount(ids, minlength=E)
    cap = math.ceil(16 * 1 * 1.0 / E)
    assert selected.max() > cap
    y, stats = mlp(x)
    assert stats["expert_counts"].max() <= cap
    assert stats["expert_counts"].tolist() == selected.clamp(max=cap).tolist()
    assert int(stats["dropped_tokens"]) == int((selected - cap).clamp(min=0).sum())
    # expert 0 keeps its first `cap` tokens in order; the later ones get the shared part only
    mine = (ids == 0).nonzero().flatten()
    kept, dropped = mine[:cap], mine[cap:]
    y = y.reshape(-1, H)
    torch.testing.assert_close(y[dropped], mlp.shared(flat[dropped]))
    others = [n for n in range(16) if n not in dropped.tolist()]
    slots = [s for s in reference_slots(mlp, flat, make_config(moe_top_k=1)) if s[0] in others]
    torch.testing.assert_close(y[others], per_token_loop(mlp, flat, flat, slots)[others],
                               atol=1e-5, rtol=1e-5)
    assert len(kept) == cap
    # eval: nothing dropped
    _, stats_eval = mlp.eval()(x)
    assert int(stats_eval["dropped_tokens"]) == 0
    assert stats_eval["expert_counts"].tolist() == selected.tolist()


def test_capacity_top2_bounds_every_expert():
    mlp = make_moe(moe_top_k=2, moe_capacity_factor=0.75).train()
    mlp.router.expert_bias.copy_(torch.tensor([1.0, 0.5, 0.0, 0.0]))
    _, stats = mlp(torch.randn(2, 10, H))
    cap = math.ceil(20 * 2 * 0.75 / E)
    assert stats["expert_counts"].max() <= cap
    assert int(stats["expert_counts"].sum() + stats["dropped_tokens"]) == 40
    assert int(stats["dropped_tokens"]) > 0


def moe_routed_by(logits: torch.Tensor, **overrides) -> tuple[MoEMLP, torch.Tensor]:
    """A softmax MoE whose router logits for the returned tokens x (1, N, H) are `logits`
    (N, E): the gate reads the first E coordinates of x, which hold the logits."""
    mlp = make_moe(num_shared_experts=1, **overrides)
    n_tok, n_exp = logits.shape
    with torch.no_grad():
        mlp.router.gate.weight.copy_(torch.eye(n_exp, H))
    x = torch.randn(1, n_tok, H)
    x[0, :, :n_exp] = logits
    return mlp, x


def reference_capacity_keep(expert_ids: torch.Tensor, capacity: int) -> torch.Tensor:
    """(N, k) -> (N, k) bool, slot by slot: all first choices in token order, then all
    second choices, each kept while its expert has room."""
    n_tok, top_k = expert_ids.shape
    taken = [0] * E
    keep = torch.zeros(n_tok, top_k, dtype=torch.bool)
    for j in range(top_k):
        for n in range(n_tok):
            e = int(expert_ids[n, j])
            keep[n, j] = taken[e] < capacity
            taken[e] += 1
    return keep


def slots_kept(mlp: MoEMLP, flat: torch.Tensor, keep: torch.Tensor, **cfg) -> list[tuple]:
    """The reference (token, expert, weight) slots of `flat` whose (n, j) entry of keep is set."""
    slots = reference_slots(mlp, flat, make_config(**cfg))  # token-major, k per token
    top_k = keep.shape[1]
    return [s for m, s in enumerate(slots) if keep[m // top_k, m % top_k]]


def test_capacity_serves_first_choices_before_second_choices():
    # Capacity 1 per expert. In token order, expert 0 would take token 0's second choice and
    # then drop token 1's first, and expert 2 token 1's second before token 3's first.
    logits = torch.tensor([[2.0, 3.0, 0.0, -1.0],   # token 0: expert 1, then 0
                           [3.0, 0.0, 2.0, -1.0],   # token 1: expert 0, then 2
                           [-1.0, 0.0, 2.0, 3.0],   # token 2: expert 3, then 2
                           [-1.0, 2.0, 3.0, 0.0]])  # token 3: expert 2, then 1
    cfg = dict(moe_top_k=2, moe_capacity_factor=0.5)
    mlp, x = moe_routed_by(logits, **cfg)
    mlp.train()
    ids = mlp.router(x[0]).expert_ids
    assert ids[:, 0].tolist() == [1, 0, 3, 2]  # the construction routes as commented
    assert ids[:, 0].unique().numel() == E  # every first choice fits a capacity of 1 ...
    y, stats = mlp(x)
    assert int(stats["dropped_tokens"]) == 4 and stats["expert_counts"].tolist() == [1] * E
    first_only = torch.tensor([[True, False]] * 4)  # ... and takes it: seconds are dropped
    flat = x.reshape(-1, H)
    expected = per_token_loop(mlp, flat, flat, slots_kept(mlp, flat, first_only, **cfg))
    torch.testing.assert_close(y.reshape(-1, H), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_capacity_dispatch_equals_a_loop_in_choice_then_position_order(seed):
    cfg = dict(moe_top_k=2, moe_capacity_factor=0.75, num_shared_experts=1)
    mlp = make_moe(seed=seed, **cfg).train()
    mlp.router.expert_bias.copy_(torch.tensor([0.6, 0.3, 0.0, 0.0]))  # overload 0 and 1
    x = torch.randn(2, 10, H)
    flat = x.reshape(-1, H)
    ids = mlp.router(flat).expert_ids  # (20, 2)
    capacity = math.ceil(20 * 2 * 0.75 / E)
    keep = reference_capacity_keep(ids, capacity)
    # The priority matters here: token order would keep a different set of slots.
    in_token_order = reference_capacity_keep(ids.reshape(-1, 1), capacity).reshape(20, 2)
    assert not torch.equal(keep, in_token_order)
    y, stats = mlp(x)
    assert int(stats["dropped_tokens"]) == int((~keep).sum()) > 0
    expected = per_token_loop(mlp, flat, flat, slots_kept(mlp, flat, keep, **cfg))
    torch.testing.assert_close(y.reshape(-1, H), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("top_k", [2, 3])
def test_capacity_never_keeps_a_later_choice_while_dropping_an_earlier_one(top_k):
    torch.manual_seed(0)
    n_tok, capacity = 64, 20
    # Skewed choices: experts 0 and 1 are popular, so their capacity runs out.
    scores = torch.rand(n_tok, E) + torch.tensor([1.0, 0.6, 0.0, 0.0])
    expert_ids = scores.topk(top_k, dim=-1).indices  # (N, k)
    keep = _within_capacity(expert_ids, E, capacity)
    assert torch.equal(keep, reference_capacity_keep(expert_ids, capacity))
    for e in range(E):
        mine = expert_ids == e  # (N, k)
        assert int((keep & mine).sum()) == min(capacity, int(mine.sum()))
        for j in range(top_k):
            if (mine[:, j] & ~keep[:, j]).any():  # a j-th choice of e was dropped ...
                assert not (keep[:, j + 1:] & mine[:, j + 1:]).any()  # ... no later one kept
    assert (~keep[:, 0]).any() and (~keep).sum() > (~keep[:, 0]).sum()  # both kinds dropped


# --- 4. aux loss ------------------------------------------------------------------------------
@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_aux_loss_formula_and_gradient(score):
    coef = 0.05
    mlp = make_moe(moe_balance="aux_loss", moe_aux_loss_coef=coef, moe_score=score)
    flat = torch.randn(12, H)
    ids, _, probs = token_choices(mlp.router, flat)
    f = torch.bincount(ids.reshape(-1), minlength=E).float() / ids.numel()
    dist = probs / probs.sum(-1, keepdim=True)
    expected = coef * E * (f * dist.mean(0)).sum()
    _, stats = mlp(flat[None])
    torch.testing.assert_close(stats["aux_loss"], expected)
    assert stats["aux_loss"].dtype == torch.float32
    mlp.zero_grad()
    stats["aux_loss"].backward()
    assert mlp.router.gate.weight.grad.abs().sum() > 0
    entropy = -(dist * dist.log()).sum(-1).mean()
    torch.testing.assert_close(stats["router_entropy"], entropy)
    assert not stats["router_entropy"].requires_grad


def test_aux_loss_is_zero_without_aux_loss_balance():
    for balance in ("none", "aux_free", "ema"):
        _, stats = make_moe(moe_balance=balance)(torch.randn(1, 6, H))
        assert float(stats["aux_loss"]) == 0.0


# --- 5. bias balancing ------------------------------------------------------------------------
def skewed_moe(balance: str, rate: float) -> MoEMLP:
    """Sigmoid router where inputs lean along the all-ones direction and the gate rows of
    experts 0 and 1 lean the same way: those two win most tokens."""
    mlp = make_moe(moe_balance=balance, moe_aux_free_rate=rate, moe_ema_rate=rate,
                   moe_score="sigmoid").train()
    with torch.no_grad():
        mlp.router.gate.weight[0] += 0.15
        mlp.router.gate.weight[1] += 0.1
    return mlp


def skewed_batch(n: int) -> torch.Tensor:
    return torch.randn(1, n, H) + 1.0


def load_ratio(mlp: MoEMLP) -> float:
    ids = mlp.router(skewed_batch(2048)[0]).expert_ids
    load = torch.bincount(ids.reshape(-1), minlength=E).float()
    return float(load.max() / load.min().clamp_min(1e-9))


def balance_loop(mlp: MoEMLP, steps: int = 300) -> None:
    with torch.no_grad():
        for _ in range(steps):
            mlp(skewed_batch(128))
            mlp.apply_balance(mlp.pending_load())


# gamma = 0.01 (10x the default 0.001) so a few hundred updates are enough to move the bias
# by the ~0.3 that the skew needs; with 0.001 the same end needs ~10x more steps.
@pytest.mark.parametrize("balance", ["aux_free", "ema"])
def test_bias_balancing_evens_out_a_skewed_router(balance):
    torch.manual_seed(0)
    control, balanced = skewed_moe("none", 0.01), skewed_moe(balance, 0.01)
    assert load_ratio(balanced) > 3
    balance_loop(control)
    balance_loop(balanced)
    assert load_ratio(control) > 3
    # ema is a proportional controller (smooth), aux_free a sign controller (oscillates by
    # +-gamma): both end well inside the bound on this setup.
    assert load_ratio(balanced) < 1.5
    assert control.router.expert_bias.abs().sum() == 0


def test_pending_load_counts_selected_slots_and_resets():
    mlp = make_moe(moe_top_k=2, moe_capacity_factor=0.5, moe_balance="aux_free").train()
    x = torch.randn(1, 10, H)
    ids = mlp.router(x[0]).expert_ids
    mlp(x)
    mlp(x)
    expected = 2 * torch.bincount(ids.reshape(-1), minlength=E)  # before dropping
    assert mlp.pending_load().tolist() == expected.float().tolist()
    mlp.apply_balance(mlp.pending_load())
    assert mlp.pending_load().sum() == 0
    mlp.eval()(x)  # eval forwards do not count
    assert mlp.pending_load().sum() == 0


def test_balance_updates_by_hand():
    load = torch.tensor([10.0, 2.0, 4.0, 4.0])  # mean 5
    # each balance reads its own rate: the other one's is set to a value that would show
    mlp = make_moe(moe_balance="aux_free", moe_aux_free_rate=0.1, moe_ema_rate=5.0)
    mlp.apply_balance(load)
    torch.testing.assert_close(mlp.router.expert_bias, torch.tensor([-0.1, 0.1, 0.1, 0.1]))
    mlp = make_moe(moe_balance="ema", moe_ema_rate=0.1, moe_aux_free_rate=5.0, moe_ema_decay=0.5)
    mlp.apply_balance(load)
    ema = 0.5 * torch.ones(4) + 0.5 * load / 5  # loads in units of the target
    torch.testing.assert_close(mlp.load_ema, ema)
    torch.testing.assert_close(mlp.router.expert_bias, -0.1 * (ema - 1))
    assert "router.expert_bias" in mlp.state_dict() and "load_ema" in mlp.state_dict()
    assert "load_since_balance" not in mlp.state_dict()
    for balance in ("none", "aux_loss"):
        mlp = make_moe(moe_balance=balance)
        mlp.apply_balance(load)
        assert mlp.router.expert_bias.abs().sum() == 0


@pytest.mark.parametrize("balance", ["aux_free", "ema"])
def test_a_balance_step_with_nothing_seen_moves_nothing(balance):
    mlp = make_moe(moe_balance=balance, moe_aux_free_rate=0.1, moe_ema_rate=0.1)
    mlp.apply_balance(torch.tensor([10.0, 2.0, 4.0, 4.0]))
    bias, ema = mlp.router.expert_bias.clone(), mlp.load_ema
    ema = None if ema is None else ema.clone()
    mlp.apply_balance(torch.zeros(E))
    assert torch.equal(mlp.router.expert_bias, bias)
    assert ema is None or torch.equal(mlp.load_ema, ema)
    assert torch.isfinite(mlp.router.expert_bias).all()


# --- 6. the bias changes selection only -------------------------------------------------------
def test_bias_changes_selection_not_weights():
    router = TopKRouter(H, E, top_k=2, score="softmax", renormalize=False)
    x = torch.randn(20, H)
    _, _, probs = token_choices(router, x)
    router.expert_bias.copy_(torch.tensor([0.0, 5.0, 0.0, 0.0]))
    ids, weights, probs_b = token_choices(router, x)
    torch.testing.assert_close(probs_b, probs)
    assert (ids == 1).any(dim=1).all()  # expert 1 always chosen ...
    torch.testing.assert_close(weights, probs.gather(1, ids))  # ... at its unbiased score
    assert torch.equal(ids, (probs + router.expert_bias).topk(2).indices)
    router.renormalize = True
    _, w_norm, _ = token_choices(router, x)
    torch.testing.assert_close(w_norm, weights / weights.sum(-1, keepdim=True))


# --- 7. fp32 router under autocast ------------------------------------------------------------
def test_router_runs_in_fp32_under_bf16_autocast():
    mlp = make_moe(num_shared_experts=1)
    x = torch.randn(2, 9, H)
    ids, _, probs = token_choices(mlp.router, x.reshape(-1, H))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ids_a, weights_a, probs_a = token_choices(mlp.router, x.reshape(-1, H))
        y, stats = mlp(x)
    assert probs_a.dtype == weights_a.dtype == torch.float32
    assert torch.equal(ids_a, ids)
    torch.testing.assert_close(probs_a, probs, atol=0, rtol=0)
    assert y.shape == x.shape and torch.isfinite(y.float()).all()
    assert stats["aux_loss"].dtype == torch.float32
    # bf16 inputs (a model cast to bf16) are upcast too
    _, _, probs_b = token_choices(mlp.router, x.reshape(-1, H).bfloat16())
    assert probs_b.dtype == torch.float32


# --- 8. gradients -----------------------------------------------------------------------------
@pytest.mark.parametrize("router", ["topk", "expert_choice"])
def test_every_expert_shared_and_gate_get_gradient(router):
    mlp = make_moe(moe_router=router, moe_top_k=2, num_shared_experts=1)
    x = torch.randn(2, 12, H)
    y, stats = mlp(x)
    assert (stats["expert_counts"] > 0).all()
    y.square().sum().backward()
    for name in ("w_gate", "w_up", "w_down"):
        grad = getattr(mlp.experts, name).grad
        assert all(grad[e].abs().sum() > 0 for e in range(E)), name
    assert all(p.grad.abs().sum() > 0 for p in mlp.shared.parameters())
    assert mlp.router.gate.weight.grad.abs().sum() > 0  # through the weights


# --- 9. ScMoE shortcut ------------------------------------------------------------------------
def test_shortcut_feeds_router_and_routed_experts_x_feeds_shared():
    mlp = make_moe(num_shared_experts=1)
    x, s = torch.randn(2, 5, H), torch.randn(2, 5, H)
    y_xs, _ = mlp(x, shortcut=s)
    y_sx, _ = mlp(s, shortcut=x)
    y_x, _ = mlp(x)
    y_s, _ = mlp(s)
    # routed(s) + shared(x) and routed(x) + shared(s): swapping keeps the sum
    torch.testing.assert_close(y_xs + y_sx, y_x + y_s, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(y_xs, y_s - shared_part(mlp, s) + shared_part(mlp, x),
                               atol=1e-5, rtol=1e-5)
    flat_x, flat_s = x.reshape(-1, H), s.reshape(-1, H)
    slots = reference_slots(mlp, flat_s, make_config(num_shared_experts=1))
    torch.testing.assert_close(y_xs.reshape(-1, H), per_token_loop(mlp, flat_x, flat_s, slots),
                               atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="shortcut shape"):
        mlp(x, shortcut=s[:, :3])


# --- 10. bad input ----------------------------------------------------------------------------
def test_bad_arguments_raise():
    cfg = make_config(moe_top_k=3)
    with pytest.raises(ValueError, match=r"moe_top_k=3 must lie in \[1, num_experts=2\]"):
        MoEMLP(cfg, 2)
    with pytest.raises(ValueError, match="num_experts=0"):
        MoEMLP(cfg, 0)
    with pytest.raises(ValueError, match="moe_top_k=5"):
        TopKRouter(H, 4, top_k=5)
    with pytest.raises(ValueError, match="num_experts=0"):
        ExpertChoiceRouter(H, 0)
    with pytest.raises(ValueError, match="moe_score='relu'"):
        TopKRouter(H, 4, top_k=1, score="relu")
    with pytest.raises(ValueError, match="expected"):
        make_moe(moe_balance="aux_free").apply_balance(torch.ones(3))


# --- 11. causal routing for expert choice -----------------------------------------------------
def small_expert_choice_model(factor: float = 1.0, **overrides) -> HybridLM:
    """Two layers of attention + expert choice, untied head; the routed experts' init is
    widened so that routing visibly moves the logits."""
    cfg = ModelConfig(
        vocab_size=61, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=64, num_experts=E, max_position_embeddings=64,
        mlp_pattern="E", moe_router="expert_choice", moe_ec_capacity_factor=factor,
        tie_word_embeddings=False, **overrides,
    )
    torch.manual_seed(0)
    model = HybridLM(cfg)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, MoEMLP):
                for p in (*module.experts.parameters(), module.router.gate.weight):
                    p.normal_(0.0, 0.3)
    return model


def with_future_changed(ids: torch.Tensor, t: int) -> torch.Tensor:
    """ids (B, T) with every token from position t on replaced by a different one."""
    changed = ids.clone()
    changed[:, t:] = (ids[:, t:] + 1 + torch.randint(0, 59, ids[:, t:].shape)) % 61
    return changed


@torch.no_grad()
def past_logits_change(model: HybridLM, ids: torch.Tensor, t: int) -> float:
    """max |logits[:, :t]| change when the tokens from t on change."""
    before = model(ids).logits[:, :t]
    after = model(with_future_changed(ids, t)).logits[:, :t]
    return float((before - after).abs().max())


@torch.no_grad()
def reference_token_choice_slots(mlp: MoEMLP, xr: torch.Tensor, k: int) -> list[tuple]:
    """Each token's k best experts by score, weighted by the score itself, one at a time."""
    logits = xr.float() @ mlp.router.gate.weight.float().T  # (N, E)
    probs = logits.softmax(-1) if mlp.router.score == "softmax" else logits.sigmoid()
    slots = []
    for n in range(probs.shape[0]):
        chosen = sorted(range(probs.shape[1]), key=lambda e: -float(probs[n, e]))[:k]
        slots += [(n, e, probs[n, e]) for e in chosen]
    return slots


@pytest.mark.parametrize("factor, k", [(None, 1), (0.3, 1), (1.49, 1), (1.5, 2), (2.5, 3),
                                       (10.0, E)])
def test_causal_top_k_is_the_capacity_factor_rounded_half_up(factor, k):
    assert ExpertChoiceRouter(H, E, factor).causal_top_k == k


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
@pytest.mark.parametrize("factor", [1.0, 2.0, 3.0])
def test_causal_routing_is_token_choice_over_the_same_scores(score, factor):
    cfg = dict(moe_router="expert_choice", moe_score=score, moe_ec_capacity_factor=factor,
               num_shared_experts=1)
    mlp = make_moe(**cfg)
    x = torch.randn(3, 5, H)
    flat = x.reshape(-1, H)
    y_expert_choice, _ = mlp(x)
    with causal_routing(mlp):
        assert mlp.is_causal
        y, stats = mlp(x)
    assert not mlp.is_causal and not mlp.router.causal  # restored
    k = mlp.router.causal_top_k
    slots = reference_token_choice_slots(mlp, flat, k)
    torch.testing.assert_close(y.reshape(-1, H), per_token_loop(mlp, flat, flat, slots),
                               atol=1e-5, rtol=1e-5)
    assert int(stats["expert_counts"].sum()) == 15 * k
    assert (y - y_expert_choice).abs().max() > 0.1  # the two routings differ here
    # a token's output is its own: the same token alone gives the same row
    with causal_routing(mlp):
        alone, _ = mlp(x[:1, 2:3])
    torch.testing.assert_close(alone[0, 0], y[0, 2], atol=1e-5, rtol=1e-5)


def test_causal_routing_restores_each_routers_setting_even_on_error():
    model = small_expert_choice_model()
    routers = [m for m in model.modules() if isinstance(m, ExpertChoiceRouter)]
    routers[1].causal = True
    with pytest.raises(RuntimeError), model.causal_routing():
        assert all(r.causal for r in routers)
        raise RuntimeError
    assert [r.causal for r in routers] == [False, True]
    with model.causal_routing(False):
        assert not any(r.causal for r in routers) and not model.is_causal
    assert [r.causal for r in routers] == [False, True]


@pytest.mark.parametrize("mixer", ["A", "M"])
def test_causal_routing_keeps_the_future_out_of_earlier_logits(mixer):
    model = small_expert_choice_model(mixer_pattern=mixer, mamba_d_state=4,
                                      mamba_chunk_size=8)
    ids = torch.randint(0, 61, (2, 32))
    t = 24
    leak = past_logits_change(model.train(), ids, t)  # expert choice, as trained
    with torch.no_grad():
        scale = float(model(ids).logits.abs().max())
    assert leak > 1e-3 * scale  # the default routing sees the future: the test has power
    with model.causal_routing():
        assert model.is_causal
        causal_change = past_logits_change(model.eval(), ids, t)
    assert causal_change < 1e-4 * leak, (causal_change, leak)


@torch.no_grad()
def cached_vs_full_gap(model: HybridLM, ids: torch.Tensor, prompt: int) -> float:
    """max |logits| gap between one full forward and prefill(prompt) + one-token decodes."""
    full = model(ids).logits  # (B, T, V)
    cache = model.new_cache(ids.shape[0], ids.shape[1])
    steps = [model(ids[:, :prompt], cache=cache).logits]
    for i in range(prompt, ids.shape[1]):
        steps.append(model(ids[:, i:i + 1], cache=cache).logits)
    return float((torch.cat(steps, dim=1) - full).abs().max())


def test_causal_routing_lets_expert_choice_decode_with_a_cache():
    model = small_expert_choice_model(factor=2.0).eval()
    ids = torch.randint(0, 61, (2, 16))
    with torch.no_grad():
        expert_choice = model(ids).logits
        with model.causal_routing():
            routing_effect = float((model(ids).logits - expert_choice).abs().max())
    assert routing_effect > 1e-2 * float(expert_choice.abs().max())
    with model.causal_routing():
        gap = cached_vs_full_gap(model, ids, prompt=5)
        out = model.generate(ids[:, :5], max_new_tokens=4, do_sample=False)
    assert gap < 1e-4 * routing_effect, (gap, routing_effect)
    assert out.shape == (2, 9)
    with pytest.raises(ValueError, match="causal_routing"):  # outside the block: refused
        model.generate(ids[:, :5], max_new_tokens=4)


def test_cache_parity_notices_expert_choice_routing(monkeypatch):
    """The breakage the parity test must catch: decoding with the expert-choice rule (one
    token per step, so every expert takes it) instead of the causal one."""
    model = small_expert_choice_model(factor=2.0).eval()
    monkeypatch.setattr(MoEMLP, "is_causal", property(lambda self: True))
    ids = torch.randint(0, 61, (2, 16))
    with torch.no_grad():
        with model.causal_routing():
            token_choice = model(ids).logits
        routing_effect = float((model(ids).logits - token_choice).abs().max())
    assert cached_vs_full_gap(model, ids, prompt=5) > 1e-2 * routing_effect


# --- 12. the sync-free dispatch: every router, as a compiled graph runs it --------------------
@pytest.fixture
def sync_free(monkeypatch):
    """`torch.compiler.is_compiling()` true: GroupedExperts takes the padded, sync-free path
    that compiled graphs (and CUDA without the grouped-GEMM kernel) run."""
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)


@pytest.mark.parametrize("router, factor", [("topk", None), ("topk", 0.75),
                                            ("expert_choice", 0.5), ("expert_choice", 2.0),
                                            ("causal", 2.0)])
def test_every_router_sync_free_equals_per_token_loop(sync_free, router, factor):
    learned = "topk" if router == "topk" else "expert_choice"
    factor_field = "moe_capacity_factor" if learned == "topk" else "moe_ec_capacity_factor"
    cfg = dict(moe_router=learned, moe_top_k=2, num_shared_experts=1, **{factor_field: factor})
    mlp = make_moe(**cfg).train()
    mlp.router.causal = router == "causal"
    if router == "topk":
        mlp.router.expert_bias.copy_(torch.tensor([0.6, 0.3, 0.0, 0.0]))  # overload 0 and 1
    x = torch.randn(2, 10, H)
    flat = x.reshape(-1, H)
    routing = mlp.router(flat)
    if router == "causal":
        slots = reference_token_choice_slots(mlp, flat, mlp.router.causal_top_k)
    elif router == "topk" and factor is not None:
        capacity = math.ceil(20 * 2 * factor / E)
        assert routing.capacity == capacity
        keep = reference_capacity_keep(routing.expert_ids, capacity)
        slots = slots_kept(mlp, flat, keep, **cfg)
    else:
        slots = reference_slots(mlp, flat, make_config(**cfg))
    y, stats = mlp(x)
    torch.testing.assert_close(y.reshape(-1, H), per_token_loop(mlp, flat, flat, slots),
                               atol=1e-5, rtol=1e-5)
    counts = torch.bincount(torch.tensor([e for _, e, _ in slots]), minlength=E)
    assert stats["expert_counts"].tolist() == counts.tolist()
    y.square().sum().backward()
    assert mlp.router.gate.weight.grad.abs().sum() > 0
