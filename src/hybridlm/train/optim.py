"""AdamW with decoupled weight decay on matrices only.

Norm weights, biases, embeddings (and the tied lm_head), mu_init/mu_param vectors and
parameters marked `_no_weight_decay` (Mamba's A_log and D) get no weight decay: shrinking them
toward zero has no regularising meaning.
"""

from __future__ import annotations

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    embedding_params = {
        id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)
    }
    decay, no_decay = [], []
    for _, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if (param.dim() < 2 or id(param) in embedding_params
                or getattr(param, "_no_weight_decay", False)):
            no_decay.append(param)
        else:
            decay.append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(
    model: nn.Module, lr: float, weight_decay: float = 0.1, betas: tuple[float, float] = (0.9, 0.95)
) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas)
