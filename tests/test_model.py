import pytest
import torch

from hybridlm import HybridLM, zipf_routing_table
from hybridlm.layers.scaler import DynamicScaler


def test_forward_shapes_loss_and_aux(make_model):
    model = make_model()
    ids = torch.randint(0, 97, (2, 10))
    out = model(ids, labels=ids)
    assert out.logits.shape == (2, 10, 97)
    # at init the loss is close to log(V)
    assert abs(out.loss.item() - torch.log(torch.tensor(97.0)).item()) < 0.5
    counts = out.aux["expert_counts"]
    assert len(counts) == 3 and all(int(c.sum()) == 20 for c in counts)
    assert torch.equal(counts[0], torch.bincount(ids.reshape(-1) % 4, minlength=4))
    assert len(out.aux["mu_norms"]) == 2  # the last layer produces no mu (nothing reads it)


def test_labels_are_shifted_inside_and_minus_100_ignored(make_model):
    model = make_model()
    ids = torch.randint(0, 97, (1, 8))
    out = model(ids, labels=ids)
    manual = torch.nn.functional.cross_entropy(out.logits[0, :-1], ids[0, 1:])
    torch.testing.assert_close(out.loss, manual)
    labels = ids.clone()
    labels[0, 5:] = -100
    partial = model(ids, labels=labels).loss
    manual = torch.nn.functional.cross_entropy(out.logits[0, :4], ids[0, 1:5])
    torch.testing.assert_close(partial, manual)


@pytest.mark.parametrize("scaler", [False, True])
def test_every_expert_shared_expert_and_mu_parameter_gets_gradient(make_model, scaler):
    model = make_model(pid_scaler=scaler).train()
    if scaler:
        # At init the controller weight is 0 and every mu is exactly 0, where |mu| has zero
        # gradient; give both the non-zero values they take after the first steps.
        with torch.no_grad():
            for block in model.layers:
                block.scaler.controller.weight.normal_(0, 0.1)
                if block.mu_update is not None:
                    block.mu_update.mu_param.normal_(0, 0.1)
    ids = torch.arange(64).reshape(2, 32) % 97  # every expert sees tokens
    model(ids, labels=ids).loss.backward()
    params = list(model.named_parameters())
    assert all(torch.isfinite(p.grad).all() for _, p in params)
    no_grad = [n for n, p in params if p.grad is None or p.grad.abs().sum() == 0]
    assert no_grad == []
    for block in model.layers:
        grads = block.mlp.experts.w_down.grad
        assert all(grads[e].abs().sum() > 0 for e in range(4))
        assert block.mlp.shared.down_proj.weight.grad.abs().sum() > 0
    assert model.mu_init.grad.abs().sum() > 0
    assert model.layers[0].mu_update.mu_proj.weight.grad.abs().sum() > 0
    assert model.layers[0].mu_update.mu_param.grad.abs().sum() > 0


def test_mu_off_reproduces_a_plain_block(make_model):
    """A mu model whose mu columns are zero equals the model built without mu."""
    plain = make_model(seed=1, mu_guidance=False)
    mu = make_model(seed=2, mu_guidance=True)
    plain_state = plain.state_dict()
    with torch.no_grad():
        for name, p in mu.named_parameters():
            if name.endswith("qkv_proj.weight"):
                p.zero_()
                p[:, : p.shape[1] // 2].copy_(plain_state[name])
            elif name in plain_state:
                p.copy_(plain_state[name])
            else:  # mu-only parameters: mu_init, mu_proj, mu_param
                p.normal_()
    ids = torch.randint(0, 97, (2, 12))
    torch.testing.assert_close(mu(ids).logits, plain(ids).logits, atol=1e-5, rtol=1e-5)
    assert mu.num_parameters() > plain.num_parameters()


def test_mu_changes_the_output_once_it_is_nonzero(make_model):
    model = make_model()
    ids = torch.randint(0, 97, (1, 6))
    before = model(ids).logits
    with torch.no_grad():
        model.mu_init.fill_(1.0)
    assert not torch.allclose(model(ids).logits, before, atol=1e-4)


def test_mu_clamp_and_ema_rules(make_model):
    model = make_model()
    upd = model.layers[0].mu_update
    with torch.no_grad():
        upd.mu_param.fill_(5.0)
    h = torch.randn(1, 3, 32)
    assert torch.equal(upd(h, torch.zeros_like(h)), torch.full_like(h, 2.0))  # clamp(5) = 2
    ema = make_model(mu_update="ema").layers[0].mu_update
    assert ema.mu_param is None
    with torch.no_grad():
        ema.mu_proj.weight.copy_(torch.eye(32))
    prev = torch.randn(1, 3, 32)
    torch.testing.assert_close(ema(h, prev), 0.9 * prev + 0.1 * h)


def test_dynamic_scaler_formula():
    scaler = DynamicScaler(bias_init=0.0)
    with torch.no_grad():
        scaler.controller.weight.copy_(torch.tensor([[1.0, -2.0, 0.5]]))
    h, mu, prev = torch.randn(2, 3, 8), torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    rms = lambda t: t.pow(2).mean(-1).sqrt()
    expected = torch.sigmoid(rms(h) - 2 * rms(mu) + 0.5 * rms(mu - prev)).unsqueeze(-1)
    torch.testing.assert_close(scaler(h, mu, prev), expected)


def test_dynamic_scaler_scales_the_residual(make_model):
    model = make_model(pid_scaler=True, pid_scaler_bias_init=-30.0)
    ids = torch.randint(0, 97, (1, 5))
    # s ~ 0: each block adds nothing, so logits come from the embedding alone
    h = model.embed_tokens(ids)
    torch.testing.assert_close(model(ids).logits, model.lm_head(model.norm(h)), atol=1e-5,
                               rtol=1e-5)


def test_activation_clamp_bounds_the_hidden_state(make_model):
    model = make_model(activation_clamp=0.01)
    with torch.no_grad():
        model.embed_tokens.weight.mul_(100)
    seen = []
    model.layers[-1].register_forward_hook(lambda m, i, o: seen.append(o[0]))
    model(torch.randint(0, 97, (1, 5)))
    assert seen[0].abs().max() <= 0.01


def test_logits_do_not_depend_on_the_rest_of_the_batch(make_model):
    model = make_model()
    a = torch.randint(0, 97, (1, 16))
    others = torch.randint(0, 97, (5, 16))
    alone = model(a).logits
    together = model(torch.cat([others[:2], a, others[2:]])).logits[2:3]
    torch.testing.assert_close(alone, together, atol=1e-5, rtol=1e-5)


def test_zipf_table_is_installed_in_every_layer(make_model):
    model = make_model(tr_routing="zipf")
    table = zipf_routing_table(torch.arange(97, 0, -1), 4)
    model.set_routing_table(table)
    ids = torch.randint(0, 97, (1, 20))
    counts = model(ids).aux["expert_counts"]
    assert all(torch.equal(c, torch.bincount(table[ids[0]], minlength=4)) for c in counts)
    with pytest.raises(ValueError, match="shape"):
        model.set_routing_table(torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        model.set_routing_table(torch.full((97,), 9))


@pytest.mark.parametrize("bad", [97, 1000, -1])
def test_out_of_range_token_ids_are_refused(make_model, bad):
    model = make_model()
    ids = torch.tensor([[1, 2, bad]])
    with pytest.raises(ValueError, match=f"token id {bad} is outside \\[0, vocab_size=97\\)"):
        model(ids)


def test_float_or_empty_input_is_refused(make_model):
    model = make_model()
    with pytest.raises(ValueError, match="integer tensor"):
        model(torch.zeros(1, 3))
    with pytest.raises(ValueError, match="empty"):
        model(torch.zeros(1, 0, dtype=torch.long))


def test_too_long_sequence_is_refused(make_model):
    model = make_model()
    with pytest.raises(ValueError, match="max_position_embeddings=64"):
        model(torch.zeros(1, 65, dtype=torch.long))


def test_dense_mlp_model_runs(make_model):
    model = make_model(mlp_pattern="D")
    ids = torch.randint(0, 97, (2, 6))
    out = model(ids, labels=ids)
    assert out.aux["expert_counts"] == [] and torch.isfinite(out.loss)
    assert model.num_parameters(active=True) == model.num_parameters()


def test_tiny_model_loss_falls_on_repeated_text(make_model, fit_fixed_batch):
    model = make_model().train()
    ids = torch.randint(0, 97, (4, 32))
    losses = fit_fixed_batch(model, ids, steps=30)
    assert losses[-1] < 0.5 * losses[0]


def test_isinstance_model(make_model):
    assert isinstance(make_model(), HybridLM)


def test_zipf_routing_builds_one_table_per_expert_count(make_model):
    model = make_model(num_hidden_layers=2, mlp_pattern="T", num_experts_per_layer=[4, 2],
                       tr_routing="zipf")
    counts = torch.arange(97, 0, -1)
    model.set_zipf_routing(counts)
    assert torch.equal(model.layers[0].mlp.router.table, zipf_routing_table(counts, 4))
    assert torch.equal(model.layers[1].mlp.router.table, zipf_routing_table(counts, 2))
    with pytest.raises(ValueError, match="token_counts has 98 entries but vocab_size=97"):
        model.set_zipf_routing(torch.ones(98))
