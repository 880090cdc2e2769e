import pytest
import torch
import torch.nn.functional as F

from hybridlm import modulo_routing_table, zipf_routing_table
from hybridlm.layers.experts import GroupedExperts
from hybridlm.layers.routing import Routing
from hybridlm.layers.routing_tables import expert_mass
from hybridlm.layers.token_routed import TokenRoutedMLP


def per_token_loop(experts: GroupedExperts, x, expert_ids, weights=None):
    """The obvious definition: each token through each of its experts, one at a time."""
    out = torch.zeros_like(x)
    for n in range(x.shape[0]):
        for j in range(expert_ids.shape[1]):
            e = int(expert_ids[n, j])
            h = F.silu(x[n] @ experts.w_gate[e]) * (x[n] @ experts.w_up[e])
            w = 1.0 if weights is None else weights[n, j]
            out[n] += w * (h @ experts.w_down[e])
    return out


def _experts(num_experts=4, hidden=8, inter=16, seed=0):
    torch.manual_seed(seed)
    ex = GroupedExperts(num_experts, hidden, inter)
    for p in ex.parameters():
        torch.nn.init.normal_(p, 0, 0.3)
    return ex


@pytest.mark.parametrize(
    "loads",
    [
        [5, 5, 5, 5],  # balanced
        [17, 1, 1, 1],  # skewed
        [0, 12, 0, 8],  # empty experts
        [20, 0, 0, 0],  # everything on one expert
        [1, 2, 3, 14],
    ],
)
def test_dispatch_equals_per_token_loop(loads):
    ex = _experts()
    ids = torch.cat([torch.full((n,), e) for e, n in enumerate(loads)])
    ids = ids[torch.randperm(len(ids), generator=torch.Generator().manual_seed(1))][:, None]
    x = torch.randn(len(ids), 8)
    y, counts = ex(x, Routing.token_choice(ids, 4))
    assert counts.tolist() == loads
    torch.testing.assert_close(y, per_token_loop(ex, x, ids), atol=1e-5, rtol=1e-5)


def test_dispatch_top2_weighted_equals_loop():
    ex = _experts()
    x = torch.randn(11, 8)
    ids = torch.stack([torch.randint(0, 4, (11,)), torch.randint(0, 4, (11,))], dim=1)
    w = torch.rand(11, 2)
    y, counts = ex(x, Routing.token_choice(ids, 4, w))
    assert counts.sum() == 22
    torch.testing.assert_close(y, per_token_loop(ex, x, ids, w), atol=1e-5, rtol=1e-5)


def test_equal_split_dispatch_would_be_wrong():
    """Guards the known defect: cutting sorted tokens into equal N/E chunks misroutes them."""
    ex = _experts()
    ids = torch.tensor([[0]] * 6 + [[1]] * 2)  # unequal loads
    x = torch.randn(8, 8)
    order = torch.argsort(ids[:, 0], stable=True)
    chunks = x[order].chunk(4)  # the defective equal split
    wrong = torch.cat([
        F.silu(c @ ex.w_gate[e]) * (c @ ex.w_up[e]) @ ex.w_down[e] for e, c in enumerate(chunks)
    ])
    y, _ = ex(x, Routing.token_choice(ids, 4))
    assert not torch.allclose(y[order], wrong, atol=1e-4)
    torch.testing.assert_close(y, per_token_loop(ex, x, ids), atol=1e-5, rtol=1e-5)


def test_token_routed_mlp_routes_by_table_and_adds_shared():
    torch.manual_seed(0)
    mlp = TokenRoutedMLP(8, 16, num_experts=3, vocab_size=10, num_shared_experts=2,
                         shared_expert_size=12)
    assert mlp.shared.gate_proj.out_features == 2 * 12
    for p in mlp.parameters():
        torch.nn.init.normal_(p, 0, 0.3)
    table = torch.tensor([2, 2, 0, 1, 0, 2, 1, 1, 0, 0])
    mlp.router.set_table(table)
    ids = torch.tensor([[3, 3, 9, 1], [0, 5, 6, 2]])
    x = torch.randn(2, 4, 8)
    y, stats = mlp(x, token_ids=ids)
    flat = x.reshape(-1, 8)
    expected = per_token_loop(mlp.experts, flat, table[ids.reshape(-1)][:, None]) + mlp.shared(flat)
    torch.testing.assert_close(y.reshape(-1, 8), expected, atol=1e-5, rtol=1e-5)
    expected_counts = torch.bincount(table[ids.reshape(-1)], minlength=3)
    assert stats["expert_counts"].tolist() == expected_counts.tolist()


def test_token_routed_without_token_ids_is_an_error():
    mlp = TokenRoutedMLP(8, 16, num_experts=2, vocab_size=10, num_shared_experts=0)
    assert mlp.shared is None
    with pytest.raises(ValueError, match="token ids"):
        mlp(torch.randn(1, 3, 8))


def test_modulo_table():
    assert modulo_routing_table(7, 3).tolist() == [0, 1, 2, 0, 1, 2, 0]


def test_zipf_table_balances_mass_better_than_modulo():
    vocab, experts = 4000, 4
    # Zipf counts, with the frequent ids placed so that modulo piles them up (ranks 0,4,8..).
    ranks = torch.arange(1, vocab + 1, dtype=torch.float64)
    counts = (1e6 / ranks).floor()
    counts = counts[torch.randperm(vocab, generator=torch.Generator().manual_seed(0))]
    zipf = zipf_routing_table(counts, experts)
    mod = modulo_routing_table(vocab, experts)
    zipf_mass, mod_mass = expert_mass(zipf, counts, experts), expert_mass(mod, counts, experts)
    spread = lambda m: float(m.max() / m.min())
    assert spread(zipf_mass) < 1.01  # greedy packing: within ~1% (the top token is 1e6 alone)
    assert spread(mod_mass) > spread(zipf_mass) + 0.05
    # every expert gets tokens, zero-count tokens are spread too
    assert torch.bincount(zipf, minlength=experts).min() > vocab // experts // 2


def test_zipf_table_is_deterministic_and_fast():
    counts = torch.randint(0, 1000, (32000,))
    a, b = zipf_routing_table(counts, 4), zipf_routing_table(counts.clone(), 4)
    assert torch.equal(a, b) and a.shape == (32000,) and int(a.max()) == 3


def test_zipf_table_bad_input():
    with pytest.raises(ValueError, match="num_experts=0"):
        zipf_routing_table([1, 2, 3], 0)
    with pytest.raises(ValueError, match="non-negative"):
        zipf_routing_table([1, -2, 3], 2)


def test_every_expert_gets_gradient():
    ex = _experts()
    x = torch.randn(40, 8, requires_grad=True)
    ids = torch.arange(40)[:, None] % 4
    y, _ = ex(x, Routing.token_choice(ids, 4))
    y.square().sum().backward()
    for name in ("w_gate", "w_up", "w_down"):
        grad = getattr(ex, name).grad
        assert all(grad[e].abs().sum() > 0 for e in range(4)), name


# --- the sync-free dispatch (what a compiled graph and CUDA run) --------------------------------
@pytest.fixture(params=["eager", "sync_free"])
def dispatch_path(request, monkeypatch):
    """Run GroupedExperts eagerly on CPU (the loop over experts) or as inside a compiled graph
    (`torch.compiler.is_compiling()` true: the padded, sync-free grouped SwiGLU)."""
    if request.param == "sync_free":
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    return request.param


@pytest.mark.parametrize("loads", [[5, 5, 5, 5], [0, 12, 0, 8], [1, 0, 0, 0], [1, 2, 3, 14]])
def test_both_dispatch_paths_equal_per_token_loop(dispatch_path, loads):
    ex = _experts()
    ids = torch.cat([torch.full((n,), e) for e, n in enumerate(loads)])
    ids = ids[torch.randperm(len(ids), generator=torch.Generator().manual_seed(1))][:, None]
    x = torch.randn(len(ids), 8)
    y, counts = ex(x, Routing.token_choice(ids, 4, distinct=True))
    assert counts.tolist() == loads
    torch.testing.assert_close(y, per_token_loop(ex, x, ids), atol=1e-5, rtol=1e-5)


def test_dropped_slots_add_nothing_and_are_not_counted(dispatch_path):
    ex = _experts()
    x = torch.randn(9, 8, requires_grad=True)
    ids = torch.stack([torch.arange(9) % 4, (torch.arange(9) + 1) % 4], dim=1)  # (9, 2)
    w = torch.rand(9, 2)
    keep = torch.rand(9, 2, generator=torch.Generator().manual_seed(0)) < 0.6
    routing = Routing.token_choice(ids, 4, w, distinct=True).keep(keep.reshape(-1))
    assert routing.expert_idx.shape == (18,)  # dropped slots stay, sent to the drop bin
    y, counts = ex(x, routing)
    assert int(routing.dropped) == int((~keep).sum()) > 0
    assert counts.tolist() == torch.bincount(ids[keep], minlength=4).tolist()
    torch.testing.assert_close(y, per_token_loop(ex, x, ids, w * keep), atol=1e-5, rtol=1e-5)
    y.square().sum().backward()
    dropped_only = [n for n in range(9) if not keep[n].any()]
    assert all(x.grad[n].abs().sum() == 0 for n in dropped_only)


def test_token_major_combine_equals_the_scatter_of_any_order(dispatch_path):
    """The permutation-and-sum combine of token-major slots gives what index_add gives for
    the same slots in any order (here reversed, top_k unset)."""
    ex = _experts()
    x = torch.randn(7, 8)
    ids = torch.stack([torch.arange(7) % 4, (torch.arange(7) + 2) % 4], dim=1)
    w = torch.rand(7, 2)
    token_major = Routing.token_choice(ids, 4, w, distinct=True)
    flip = torch.arange(13, -1, -1)
    any_order = Routing(token_major.token_idx[flip], token_major.expert_idx[flip],
                        token_major.weights[flip], 4)
    y_major, _ = ex(x, token_major)
    y_any, _ = ex(x, any_order)
    torch.testing.assert_close(y_major, y_any, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(y_major, per_token_loop(ex, x, ids, w), atol=1e-5, rtol=1e-5)


def test_token_routed_mlp_sync_free_equals_loop(dispatch_path):
    torch.manual_seed(0)
    mlp = TokenRoutedMLP(8, 16, num_experts=3, vocab_size=10, num_shared_experts=0)
    for p in mlp.parameters():
        torch.nn.init.normal_(p, 0, 0.3)
    ids = torch.tensor([[3, 3, 9, 1], [0, 5, 6, 2]])
    x = torch.randn(2, 4, 8)
    y, stats = mlp(x, token_ids=ids)
    table = mlp.router.table
    expected_counts = torch.bincount(table[ids.reshape(-1)], minlength=3)
    assert stats["expert_counts"].tolist() == expected_counts.tolist()
    expected = per_token_loop(mlp.experts, x.reshape(-1, 8), table[ids.reshape(-1)][:, None])
    torch.testing.assert_close(y.reshape(-1, 8), expected, atol=1e-5, rtol=1e-5)
