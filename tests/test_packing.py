"""Packed rows (segment_ids): several examples in one row compute exactly as each one alone."""

import pytest
import torch
import torch.nn.functional as F

from hybridlm.layers.attention import segment_mask
from hybridlm.layers.rope import RotaryEmbedding, apply_rope, segment_positions, segment_starts
from hybridlm.ops.selective_scan import selective_scan_chunked, selective_scan_sequential

MIXERS = ["A", "L", "M", "AM", "MLA"]


def _config(pattern: str) -> dict:
    # Dense MLPs: per-token, so packing is exact. Small MLA and Mamba widths keep it fast;
    # chunk 4 puts example boundaries both inside and on the edges of scan chunks.
    return dict(mixer_pattern=pattern, num_hidden_layers=max(2, len(pattern)), mlp_pattern="D",
                mla_kv_rank=16, mla_rope_dim=8, mamba_d_state=4, mamba_chunk_size=4)


def _examples(lengths: list[int], vocab: int = 97, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, vocab, (n,), generator=g) for n in lengths]


def _pack(examples: list[torch.Tensor], ids: list[int] | None = None):
    ids = ids if ids is not None else list(range(len(examples)))
    input_ids = torch.cat(examples)[None]
    pieces = [torch.full((len(e),), i) for e, i in zip(examples, ids, strict=True)]
    segment_ids = torch.cat(pieces)[None]
    return input_ids, segment_ids


# --- helpers -----------------------------------------------------------------------------------
def test_segment_positions_and_starts():
    seg = torch.tensor([[7, 7, 7, 2, 2, 7], [0, 0, 0, 0, 0, 0]])
    assert segment_positions(seg).tolist() == [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]]
    assert segment_starts(seg).tolist() == [[True, False, False, True, False, True],
                                            [True, False, False, False, False, False]]


def test_segment_mask_is_block_diagonal_causal():
    mask = segment_mask(torch.tensor([[3, 3, 5, 5, 5, 3]]))  # last token: a third example
    assert mask.shape == (1, 1, 6, 6)
    expected = torch.tensor([
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [0, 0, 1, 0, 0, 0],
        [0, 0, 1, 1, 0, 0],
        [0, 0, 1, 1, 1, 0],
        [0, 0, 0, 0, 0, 1],
    ], dtype=torch.bool)
    assert torch.equal(mask[0, 0], expected)


def test_rope_accepts_per_row_positions():
    rope = RotaryEmbedding(8)
    x = torch.randn(2, 3, 5, 8)  # (B, heads, T, D)
    positions = torch.tensor([[0, 1, 2, 3, 4], [0, 1, 0, 1, 2]])
    cos, sin = rope.cos_sin(positions)
    assert cos.shape == (2, 5, 8)
    out = apply_rope(x, cos, sin)
    for b in range(2):
        cos_b, sin_b = rope.cos_sin(positions[b])
        torch.testing.assert_close(out[b], apply_rope(x[b : b + 1], cos_b, sin_b)[0])
    # 3-D inputs (MLA's shared RoPE key, (B, T, D)) broadcast the same way.
    torch.testing.assert_close(apply_rope(x[:, 0], cos, sin), out[:, 0])


# --- selective scan with resets ------------------------------------------------------------------
def _scan_inputs(batch=2, length=13, inner=6, state=4, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return {
        "u": torch.randn(batch, length, inner, generator=g, dtype=dtype),
        "delta": torch.rand(batch, length, inner, generator=g, dtype=dtype) + 1e-3,
        "A": -(torch.rand(inner, state, generator=g, dtype=dtype) * 3.9 + 0.1),
        "B": torch.randn(batch, length, state, generator=g, dtype=dtype),
        "C": torch.randn(batch, length, state, generator=g, dtype=dtype),
        "D": torch.randn(inner, generator=g, dtype=dtype),
        "h0": torch.randn(batch, inner, state, generator=g, dtype=dtype),
    }


def _reset(batch=2, length=13) -> torch.Tensor:
    reset = torch.zeros(batch, length, dtype=torch.bool)
    reset[0, [0, 4, 5, 8]] = True  # 4 and 8 on chunk edges (chunk 4), 5 right after one
    reset[1, [3, 12]] = True
    return reset


@pytest.mark.parametrize("chunk_size", [1, 4, 5, 64])
def test_chunked_scan_with_reset_matches_sequential(chunk_size: int):
    x, reset = _scan_inputs(dtype=torch.float32), _reset()
    y_ref, h_ref = selective_scan_sequential(**x, reset=reset)
    y, h = selective_scan_chunked(**x, chunk_size=chunk_size, reset=reset)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h, h_ref, atol=1e-5, rtol=1e-5)


def test_scan_reset_equals_scanning_the_pieces_separately():
    x = _scan_inputs(batch=1, length=10, dtype=torch.float32)
    reset = torch.zeros(1, 10, dtype=torch.bool)
    reset[0, 6] = True
    y, h = selective_scan_chunked(**x, chunk_size=4, reset=reset)
    tail = {k: (v[:, 6:] if k in ("u", "delta", "B", "C") else v) for k, v in x.items()}
    tail["h0"] = None
    y_tail, h_tail = selective_scan_sequential(**tail)
    torch.testing.assert_close(y[:, 6:], y_tail, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h, h_tail, atol=1e-5, rtol=1e-5)


def test_scan_with_reset_gradients_match_sequential():
    x, reset = _scan_inputs(seed=3), _reset()
    weights = torch.randn(2, 13, 6, dtype=torch.float64)

    def grads(fn, **kwargs):
        leaves = {k: v.clone().requires_grad_() for k, v in x.items()}
        y, h = fn(**leaves, reset=reset, **kwargs)
        ((y * weights).sum() + h.pow(2).sum()).backward()
        return {k: v.grad for k, v in leaves.items()}

    ref = grads(selective_scan_sequential)
    got = grads(selective_scan_chunked, chunk_size=4)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], atol=1e-9, rtol=1e-7, msg=name)


def test_scan_gradcheck_with_reset():
    x = _scan_inputs(batch=1, length=7, inner=3, state=2, seed=5)
    reset = torch.tensor([[False, False, True, False, False, True, False]])
    leaves = tuple(v.requires_grad_() for v in x.values())

    def fn(*args):
        return selective_scan_chunked(*args, chunk_size=3, reset=reset)

    assert torch.autograd.gradcheck(fn, leaves)


# --- the model -----------------------------------------------------------------------------------
@pytest.mark.parametrize("pattern", MIXERS)
def test_packed_logits_equal_each_example_alone(make_model, pattern: str):
    model = make_model(**_config(pattern))
    examples = _examples([7, 12, 5], seed=len(pattern))
    input_ids, segment_ids = _pack(examples, ids=[4, 9, 4])  # ids need only differ when adjacent
    with torch.no_grad():
        packed = model(input_ids, segment_ids=segment_ids).logits[0]
        alone = torch.cat([model(e[None]).logits[0] for e in examples])
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pattern", ["A", "M", "AM"])
def test_packed_batch_rows_are_independent(make_model, pattern: str):
    model = make_model(**_config(pattern))
    a, b, c, d = _examples([6, 10, 9, 7], seed=2)
    row0, seg0 = _pack([a, b])
    row1, seg1 = _pack([c, d])
    with torch.no_grad():
        out = model(torch.cat([row0, row1]), segment_ids=torch.cat([seg0, seg1])).logits
        for row, pieces in ((0, (a, b)), (1, (c, d))):
            alone = torch.cat([model(e[None]).logits[0] for e in pieces])
            torch.testing.assert_close(out[row], alone, atol=1e-5, rtol=1e-5)


def test_single_segment_equals_no_segments(make_model):
    model = make_model(**_config("AM"))
    ids = _examples([16])[0][None]
    with torch.no_grad():
        plain = model(ids).logits
        packed = model(ids, segment_ids=torch.zeros_like(ids)).logits
    torch.testing.assert_close(packed, plain, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("pattern", ["A", "L", "M", "AM"])
def test_packed_loss_is_the_token_weighted_mean_of_the_examples(make_model, pattern: str):
    model = make_model(**_config(pattern))
    examples = _examples([8, 11, 6], seed=7)
    input_ids, segment_ids = _pack(examples)
    labels = input_ids.clone()
    labels[0, 0] = -100
    starts = segment_starts(segment_ids)
    labels_boundary = labels.masked_fill(starts, -100)  # what pack_examples produces
    with torch.no_grad():
        out = model(input_ids, labels=labels_boundary, segment_ids=segment_ids)
        # The model ignores targets at example starts by itself: same loss without -100 there.
        out_unmasked = model(input_ids, labels=labels, segment_ids=segment_ids)
        total, count = 0.0, 0
        for e in examples:
            logits = model(e[None]).logits[0]
            total += F.cross_entropy(logits[:-1], e[1:], reduction="sum").item()
            count += len(e) - 1
    expected = torch.tensor(total / count)
    torch.testing.assert_close(out.loss, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_unmasked.loss, expected, atol=1e-5, rtol=1e-5)


def test_packed_gradients_match_each_example_alone(make_model):
    model = make_model(**_config("AM")).train()
    examples = _examples([9, 7], seed=11)
    input_ids, segment_ids = _pack(examples)
    model(input_ids, labels=input_ids, segment_ids=segment_ids).loss.backward()
    packed = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    count = sum(len(e) - 1 for e in examples)
    for e in examples:  # the same token-weighted mean, accumulated example by example
        (model(e[None], labels=e[None]).loss * (len(e) - 1) / count).backward()
    for name, grad in packed.items():
        torch.testing.assert_close(grad, model.get_parameter(name).grad, atol=1e-5, rtol=1e-4,
                                   msg=name)


def test_packing_is_refused_with_a_cache(make_model):
    model = make_model(**_config("AM"))
    ids = _examples([4])[0][None]
    cache = model.new_cache(1, 8)
    with pytest.raises(ValueError, match="cache"):
        model(ids, segment_ids=torch.zeros_like(ids), cache=cache)


def test_bad_segment_ids_are_refused(make_model):
    model = make_model()
    ids = _examples([4])[0][None]
    with pytest.raises(ValueError, match="segment_ids"):
        model(ids, segment_ids=torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="segment_ids"):
        model(ids, segment_ids=torch.zeros(1, 4))
