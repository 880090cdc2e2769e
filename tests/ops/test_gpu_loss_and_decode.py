"""GPU parity of the fused LM-head loss and of the latent decode kernel against their twins
(fp32 and bf16, awkward sizes). Skipped without CUDA."""

from __future__ import annotations

import pytest
import torch

from hybridlm import ops
from hybridlm.ops import linear_cross_entropy, linear_cross_entropy_reference
from hybridlm.ops.dispatch import triton_available

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want.double()).norm() / want.double().norm())


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("rows, chunk", [(1, None), (1000, 333), (4099, 1024)])
def test_fused_loss_matches_the_reference_on_gpu(autocast, rows, chunk):
    generator = torch.Generator(device="cuda").manual_seed(rows)
    hidden = torch.randn(rows, 256, device="cuda", generator=generator, requires_grad=True)
    weight = (torch.randn(5003, 256, device="cuda", generator=generator) / 16).requires_grad_()
    targets = torch.randint(0, 5003, (rows,), device="cuda", generator=generator)
    targets[::7] = -100
    targets[0] = 3  # one target at least
    results = []
    for fn, kwargs in ((linear_cross_entropy, {"chunk_size": chunk}),
                       (linear_cross_entropy_reference, {})):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            loss = fn(hidden, weight, targets, **kwargs)
        results.append((loss, *torch.autograd.grad(loss, (hidden, weight))))
    tolerance = 1e-2 if autocast else 1e-3  # fp32 matmuls may use tf32 on either side
    for got, want in zip(*results, strict=True):
        assert got.dtype == want.dtype and relative_error(got, want) < tolerance


@pytest.mark.skipif(not triton_available(), reason="needs triton")
def test_fused_loss_takes_the_triton_kernel_and_handles_no_targets(monkeypatch):
    from hybridlm.ops import cross_entropy_kernel

    calls = []
    kernel = cross_entropy_kernel.cross_entropy_grad_
    monkeypatch.setattr(cross_entropy_kernel, "cross_entropy_grad_",
                        lambda *args: calls.append(1) or kernel(*args))
    hidden = torch.randn(100, 64, device="cuda", requires_grad=True)
    weight = torch.randn(300, 64, device="cuda", requires_grad=True)
    targets = torch.full((100,), -100, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        total = linear_cross_entropy(hidden, weight, targets, reduction="sum", chunk_size=30)
        mean = linear_cross_entropy(hidden.detach(), weight.detach(), targets)
    total.backward()
    assert len(calls) == 4  # chunks of 30, 30, 30, 10 rows
    assert float(total.detach()) == 0.0 and torch.isnan(mean)
    assert not hidden.grad.any() and not weight.grad.any()


@pytest.mark.skipif(not triton_available(), reason="needs triton")
@pytest.mark.parametrize("batch, heads, keys", [(1, 16, 1), (3, 7, 100), (8, 32, 4133)])
def test_latent_decode_kernel_matches_sdpa(batch, heads, keys):
    from hybridlm.ops.latent_decode import single_head_decode

    generator = torch.Generator(device="cuda").manual_seed(keys)
    cache = torch.randn(batch, keys + 5, 576, device="cuda", generator=generator,
                        dtype=torch.bfloat16)[:, :keys]  # a cache view: rows strided
    q = torch.randn(batch, heads, 576, device="cuda", generator=generator, dtype=torch.bfloat16)
    got = single_head_decode(q, cache, cache[..., :512], scale=0.05)
    want = torch.nn.functional.scaled_dot_product_attention(
        q[:, None].float(), cache[:, None].float(), cache[:, None, :, :512].float(), scale=0.05
    )[:, 0]
    assert got.shape == (batch, heads, 512) and got.dtype == torch.bfloat16
    assert relative_error(got, want) < 1e-2


@pytest.mark.skipif(not triton_available(), reason="needs triton")
def test_absorbed_mla_decode_takes_the_kernel_and_matches_the_reference(monkeypatch):
    from hybridlm.config import ModelConfig
    from hybridlm.layers.mla import MultiHeadLatentAttention
    from hybridlm.ops import latent_decode

    calls = []
    kernel = latent_decode.single_head_decode
    monkeypatch.setattr(latent_decode, "single_head_decode",
                        lambda *args: calls.append(1) or kernel(*args))

    config = ModelConfig(vocab_size=64, hidden_size=512, num_hidden_layers=1,
                         num_attention_heads=8, num_key_value_heads=8, intermediate_size=64,
                         mixer_pattern="L", mla_kv_rank=512, mla_rope_dim=64, mla_absorb=True,
                         max_position_embeddings=512)
    mla = MultiHeadLatentAttention(config, 0).cuda().to(torch.bfloat16)
    x = torch.randn(2, 301, 512, device="cuda", dtype=torch.bfloat16)
    outputs = []
    for impl in ("auto", "reference"):
        cache = mla.new_cache(2, 400, torch.device("cuda"), torch.bfloat16)
        with ops.use_impl(impl), torch.no_grad():
            mla(x[:, :300], positions=torch.arange(300, device="cuda"), cache=cache)
            outputs.append(mla(x[:, 300:], positions=torch.arange(300, 301, device="cuda"),
                               cache=cache))
    assert calls == [1]  # the decode step of "auto"; the reference never calls it
    assert relative_error(outputs[0], outputs[1]) < 1e-2
