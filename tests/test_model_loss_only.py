"""`model(ids, labels, return_logits=False)`: the loss through the fused chunked LM head, equal
to the default forward's loss and gradients, with no (B, T, V) logits."""

from __future__ import annotations

import pytest
import torch

from hybridlm.model import count_targets


def packed_batch(vocab: int = 97):
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(0, vocab, (2, 12), generator=generator)
    labels = ids.clone()
    labels[0, :5] = -100  # an unsupervised prompt
    segment_ids = torch.zeros_like(ids)
    segment_ids[1, 7:] = 1  # two examples packed in row 1
    return ids, labels, segment_ids


def loss_and_grads(model, **kwargs):
    model.zero_grad()
    out = model(*packed_batch()[:2], segment_ids=packed_batch()[2], **kwargs)
    out.loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return out, grads


@pytest.mark.parametrize("weighted", [False, True])
def test_loss_only_equals_the_default_loss_and_gradients(make_model, weighted):
    model = make_model(tie_word_embeddings=True)
    _, labels, segment_ids = packed_batch()
    extra = {"num_items_in_batch": count_targets(labels, segment_ids) + 3} if weighted else {}
    default, want = loss_and_grads(model, **extra)
    fused, got = loss_and_grads(model, return_logits=False, **extra)
    assert default.logits.shape == (2, 12, 97) and fused.logits is None
    torch.testing.assert_close(fused.loss, default.loss, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(fused.aux["lm_loss"], default.aux["lm_loss"], atol=1e-6, rtol=1e-6)
    assert got.keys() == want.keys() and "embed_tokens.weight" in got  # tied: one gradient
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=1e-5, msg=name)


def test_the_segment_start_and_ignored_labels_are_not_trained(make_model):
    # Changing a label that is ignored (-100 region) or sits at a segment start changes
    # nothing; changing a supervised one does.
    model = make_model()
    ids, labels, segment_ids = packed_batch()

    def loss(labels):
        return model(ids, labels=labels, segment_ids=segment_ids, return_logits=False).loss

    base = loss(labels)
    unsupervised = labels.clone()
    unsupervised[1, 7] = (labels[1, 7] + 1) % 97  # row 1's second example starts at 7
    torch.testing.assert_close(loss(unsupervised), base)
    supervised = labels.clone()
    supervised[1, 8] = (labels[1, 8] + 1) % 97
    assert not torch.allclose(loss(supervised), base)


def test_loss_only_needs_labels(make_model):
    with pytest.raises(ValueError, match="return_logits=False"):
        make_model()(torch.zeros(1, 4, dtype=torch.long), return_logits=False)
