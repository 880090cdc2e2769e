"""Held-out loss of a model over a token stream: what training reports as val_loss and the
demo prints; any model directory can be measured the same way."""

from __future__ import annotations

import contextlib

import torch

from hybridlm.data import iter_eval_windows
from hybridlm.layers.moe import causal_routing


@torch.no_grad()
def evaluate(model, tokens, seq_len: int, batch_size: int, max_batches: int,
             device: torch.device, autocast=None) -> float:
    """Mean next-token loss (nats/token, no aux losses) over contiguous windows of `seq_len`
    tokens of a held-out split (consecutive windows share one token: each token is predicted
    once). Causal: expert-choice layers route by token choice here (`causal_routing`), so no
    prediction sees a later token and the loss does not depend on the batch it is in."""
    was_training = model.training
    model.eval()
    autocast = autocast or contextlib.nullcontext()
    total, count = 0.0, 0
    with causal_routing(model):
        for window in iter_eval_windows(tokens, seq_len - 1, batch_size, max_batches):
            window = window.to(device)
            with autocast:
                loss = model(window, labels=window, return_logits=False).aux["lm_loss"]
            n = window.shape[0] * (window.shape[1] - 1)
            total += loss.item() * n
            count += n
    model.train(was_training)
    return total / count
