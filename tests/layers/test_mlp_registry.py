"""The router contract and the MLP and router registries: a router and an MLP kind defined in
this file alone train in a stack, and so does a router of learned-MoE layers registered under
a moe_router name; T and E layers mix in one stack."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hybridlm import HybridLM, ModelConfig
from hybridlm.config import ConfigError
from hybridlm.layers.experts import GroupedExperts
from hybridlm.layers.moe import MoEMLP
from hybridlm.layers.routing import Router, Routing
from hybridlm.layers.routing_tables import zipf_routing_table
from hybridlm.layers.token_routed import TokenRoutedMLP
from hybridlm.registry import (
    mlp_letters,
    register_mlp,
    register_router,
    router_names,
    unregister_mlp,
    unregister_router,
)

V, H, E = 31, 16, 4


# --- a toy router and a toy expert MLP, known to the library only through the registry -------
class HashRouter(Router):
    """Token id -> experts (id mod E, (3 id + 1) mod E), weighted by a learned softmax over a
    per-expert logit (so the router itself learns)."""

    def __init__(self, num_experts: int) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.logit = nn.Parameter(torch.zeros(num_experts))

    def choices(self, token_ids: torch.Tensor) -> torch.Tensor:
        ids = token_ids.reshape(-1)
        return torch.stack([ids % self.num_experts, (3 * ids + 1) % self.num_experts], dim=1)

    def forward(self, token_ids: torch.Tensor) -> Routing:
        expert_ids = self.choices(token_ids)  # (N, 2)
        weights = self.logit[expert_ids].softmax(dim=-1)  # (N, 2)
        return Routing.token_choice(expert_ids, self.num_experts, weights)


class HashMoE(nn.Module):
    """Hash-routed experts with the ExpertMLP and LoadBalanced protocols; apply_balance only
    records the (rank-summed) load it is handed."""

    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        experts = config.experts_in_layer(layer)
        self.router = HashRouter(experts)
        self.experts = GroupedExperts(experts, config.hidden_size, 8)
        self.pending = torch.zeros(experts)
        self.balanced_loads: list[torch.Tensor] = []

    def forward(self, x, *, token_ids=None):
        routing = self.router(token_ids)
        y, counts = self.experts(x.reshape(-1, x.shape[-1]), routing)
        if self.training:
            self.pending += routing.selected
        return y.view_as(x), {"expert_counts": counts}

    def inactive_parameters(self) -> float:
        return self.experts.unused_parameters(2)

    def pending_load(self) -> torch.Tensor:
        return self.pending

    def apply_balance(self, load: torch.Tensor) -> None:
        self.balanced_loads.append(load.clone())
        self.pending.zero_()

    def discard_loads(self) -> None:
        self.pending.zero_()


@pytest.fixture
def hash_letter():
    register_mlp("H", HashMoE, "hash-routed experts (test)")
    yield "H"
    unregister_mlp("H")


def config(**overrides) -> ModelConfig:
    base = dict(vocab_size=V, hidden_size=H, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, intermediate_size=32, num_experts=E,
                max_position_embeddings=32, mixer_pattern="A", mu_guidance=False)
    return ModelConfig(**{**base, **overrides})


def train(model: HybridLM, steps: int = 8) -> list[float]:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, V, (4, 12), generator=gen)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-2)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.balance_step(reduce=lambda t: t.mul_(2))  # as if a second rank saw the same
        losses.append(float(loss.detach()))
    return losses


def per_token_loop(mlp: HashMoE, x: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """The obvious definition: each token through its two experts, one at a time."""
    ex, out = mlp.experts, torch.zeros_like(x)
    for n, choice in enumerate(mlp.router.choices(token_ids)):
        weights = mlp.router.logit[choice].softmax(-1)
        for e, w in zip(choice.tolist(), weights, strict=True):
            out[n] += w * (F.silu(x[n] @ ex.w_gate[e]) * (x[n] @ ex.w_up[e]) @ ex.w_down[e])
    return out


def test_a_registered_router_and_mlp_train_in_a_stack(hash_letter):
    torch.manual_seed(0)
    model = HybridLM(config(mlp_pattern=hash_letter + "E", moe_top_k=2))
    toy = model.layers[0].mlp
    assert isinstance(toy, HashMoE) and isinstance(model.layers[1].mlp, MoEMLP)
    losses = train(model)
    assert losses[-1] < losses[0] - 0.3
    # balance_step found the toy by its methods and handed it the reduced load
    ids = torch.randint(0, V, (4, 12), generator=torch.Generator().manual_seed(0))
    expected = 2 * torch.bincount(toy.router.choices(ids).reshape(-1), minlength=E).float()
    assert len(toy.balanced_loads) == 8 and torch.equal(toy.balanced_loads[-1], expected)
    per_expert = sum(p[0].numel() for p in toy.experts.parameters())
    moe = model.layers[1].mlp
    moe_inactive = (E - 2) * sum(p[0].numel() for p in moe.experts.parameters())
    assert model.num_parameters(active=True) == (
        model.num_parameters() - (E - 2) * per_expert - moe_inactive)


def test_a_registered_routers_dispatch_equals_a_per_token_loop_and_trains_every_expert():
    torch.manual_seed(0)
    mlp = HashMoE(config(mlp_pattern="E"), 0)
    for p in mlp.parameters():
        nn.init.normal_(p, 0, 0.3)
    token_ids = torch.arange(20).reshape(1, 20) % V
    x = torch.randn(1, 20, H, requires_grad=True)
    y, stats = mlp(x, token_ids=token_ids)
    expected = per_token_loop(mlp, x[0], token_ids[0])
    torch.testing.assert_close(y[0], expected, atol=1e-5, rtol=1e-5)
    assert stats["expert_counts"].sum() == 40
    y.square().sum().backward()
    for name in ("w_gate", "w_up", "w_down"):
        grad = getattr(mlp.experts, name).grad
        assert all(grad[e].abs().sum() > 0 for e in range(E)), name
    assert mlp.router.logit.grad.abs().sum() > 0


def test_registering_a_taken_or_bad_letter_is_refused():
    with pytest.raises(ValueError, match="MLP 'E' is already registered to build_learned_moe"):
        register_mlp("E", HashMoE, "again")
    with pytest.raises(ValueError, match="one printable character"):
        register_mlp("hh", HashMoE, "two letters")
    with pytest.raises(ValueError, match="router 'topk' is already registered"):
        register_router("topk", HashRouter, "again")
    with pytest.raises(ValueError, match="a name without spaces"):
        register_router("my router", HashRouter, "a space")
    assert list(mlp_letters()) == ["D", "T", "E", "N"]
    assert list(router_names()) == ["topk", "expert_choice"]


# --- token-routed and learned MoE in one stack -----------------------------------------------
def test_token_routed_and_learned_moe_layers_mix_train_balance_and_reload(tmp_path):
    torch.manual_seed(0)
    cfg = config(mlp_pattern="TE", tr_routing="zipf", moe_balance="aux_free", moe_top_k=1,
                 moe_aux_free_rate=0.01)
    model = HybridLM(cfg)
    token_routed, moe = model.layers[0].mlp, model.layers[1].mlp
    assert isinstance(token_routed, TokenRoutedMLP) and isinstance(moe, MoEMLP)
    assert token_routed.experts.w_gate.shape[-1] == 32 // E  # the dense width split over E
    counts = torch.arange(V) % 7 + 1
    model.fit_routing(counts)  # what the trainer does: the T layer wants zipf
    assert torch.equal(token_routed.router.table, zipf_routing_table(counts, E))
    losses = train(model)
    assert losses[-1] < losses[0]
    assert moe.router.expert_bias.abs().sum() > 0  # balanced by the aux-free bias
    model.save_pretrained(tmp_path / "m")
    loaded = HybridLM.from_pretrained(tmp_path / "m").eval()
    ids = torch.randint(0, V, (2, 9))
    assert torch.equal(loaded(ids).logits, model.eval()(ids).logits)
    assert torch.equal(loaded.layers[0].mlp.router.table, token_routed.router.table)
    assert torch.equal(loaded.layers[1].mlp.router.expert_bias, moe.router.expert_bias)


def test_each_letter_names_one_kind_and_shared_experts_apply_to_both():
    model = HybridLM(config(mlp_pattern="TE", num_shared_experts=2, moe_intermediate_size=24))
    token_routed, moe = model.layers[0].mlp, model.layers[1].mlp
    assert isinstance(token_routed, TokenRoutedMLP) and isinstance(moe, MoEMLP)
    # two shared experts as wide as one routed expert of each layer: 32 / 4 and 24
    assert token_routed.shared.gate_proj.out_features == 2 * 8
    assert moe.shared.gate_proj.out_features == 2 * 24
    keys = set(model.state_dict())
    assert {"layers.0.mlp.router.table", "layers.0.mlp.shared.up_proj.weight",
            "layers.1.mlp.router.gate.weight", "layers.1.mlp.shared.up_proj.weight"} <= keys
    wide = HybridLM(config(mlp_pattern="TE", shared_expert_intermediate_size=5))
    assert [b.mlp.shared.gate_proj.out_features for b in wide.layers] == [5, 5]
    assert all(b.mlp.shared is None
               for b in HybridLM(config(mlp_pattern="TE", num_shared_experts=0)).layers)


def test_top_k_is_checked_against_the_learned_layers_only():
    # T layers of 2 experts do not limit the top-k of the E layers' 8
    cfg = config(num_hidden_layers=4, mlp_pattern="TE", num_experts_per_layer=[2, 8, 2, 8],
                 moe_top_k=4)
    assert cfg.moe_top_k == 4
    with pytest.raises(ConfigError, match=r"moe_top_k=4 exceeds the 3 experts of a learned-MoE "
                                          r"layer \(num_experts_per_layer\[3\]\)"):
        config(num_hidden_layers=4, mlp_pattern="TE", num_experts_per_layer=[8, 8, 8, 3],
               moe_top_k=4)
    with pytest.raises(ConfigError, match="moe_top_k=5 exceeds the 4 experts"):
        config(mlp_pattern="DE", moe_top_k=5)
    config(mlp_pattern="DT", moe_top_k=5)  # no learned layer: top-k unused


def test_t_layers_need_experts_dividing_the_mlp_width():
    with pytest.raises(ConfigError, match="num_experts=3 must divide intermediate_size=32"):
        config(mlp_pattern="TE", num_experts=3).validate()
    config(mlp_pattern="DE", num_experts=3).validate()  # no T layer: fine
    with pytest.raises(ConfigError, match="num_experts_per_layer\\[0\\]=3 must divide"):
        config(mlp_pattern="TE", num_experts_per_layer=[3, 3]).validate()


# --- a router of learned-MoE layers, registered under a moe_router name -----------------------
class SignRouter(Router):
    """Top-1 by a learned gate with softmax scores, through the contract MoEMLP reads: probs,
    selected, score and experts_per_token (and no balancing bias)."""

    score = "softmax"
    fp32_parameters = ("gate",)

    def __init__(self, hidden_size: int, num_experts: int) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.gate = nn.Linear(hidden_size, num_experts, bias=False)

    @classmethod
    def build(cls, config: ModelConfig, num_experts: int) -> SignRouter:
        return cls(config.hidden_size, num_experts)

    def forward(self, x: torch.Tensor) -> Routing:
        probs = self.gate(x).float().softmax(dim=-1)  # (N, E)
        weights, expert_ids = probs.max(dim=-1, keepdim=True)  # (N, 1) each
        return Routing.token_choice(expert_ids, self.num_experts, weights, probs)


@pytest.fixture
def sign_router():
    register_router("sign", SignRouter.build, "top-1 of a softmax gate (test)")
    yield "sign"
    unregister_router("sign")


def test_a_registered_router_trains_learned_moe_layers(sign_router):
    torch.manual_seed(0)
    model = HybridLM(config(mlp_pattern="EE", moe_router=sign_router, moe_balance="aux_loss"))
    moe = model.layers[0].mlp
    assert isinstance(moe.router, SignRouter) and moe.active_experts_per_token == 1
    inactive = (E - 1) * sum(p[0].numel() for p in moe.experts.parameters())
    assert model.num_parameters(active=True) == model.num_parameters() - 2 * inactive
    before = moe.router.gate.weight.detach().clone()
    losses = train(model)
    assert losses[-1] < losses[0] - 0.3
    assert not torch.equal(moe.router.gate.weight, before)  # the gate learns (weights, aux)


def test_an_unregistered_router_name_is_refused_with_the_known_ones():
    with pytest.raises(ConfigError, match=r"moe_router='sign' is not one of \['topk', "
                                          r"'expert_choice'\]"):
        config(mlp_pattern="E", moe_router="sign")


def test_a_block_without_mlp_is_its_mixer_alone():
    """MLP letter N (Mamba's own stacks): h + mixer(norm(h)), no MLP norm, no experts."""
    torch.manual_seed(0)
    model = HybridLM(ModelConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                                 num_attention_heads=2, num_key_value_heads=2,
                                 mixer_pattern="M", mlp_pattern="N", mu_guidance=False)).eval()
    assert not any("mlp" in name for name, _ in model.named_parameters())
    assert model.config.experts_in_layer(0) == 0
    block, h = model.layers[0], torch.randn(2, 5, 32)
    out, _, stats = block(h, token_ids=torch.zeros(2, 5, dtype=torch.long),
                          positions=torch.arange(5), cache=None, mu_prev=None)
    expected = h + block.mixer(block.mixer_norm(h), positions=torch.arange(5))
    torch.testing.assert_close(out, expected)
    assert stats == {}
