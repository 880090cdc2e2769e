"""Learning-rate schedules, as multipliers of the peak learning rate.

`step` counts optimizer steps from 0. Every schedule starts with a linear warmup and never
goes below `min_ratio`.
  cosine   : warmup, then cosine decay to min_ratio at `total_steps`.
  wsd      : warmup, stable at 1, then linear decay to min_ratio over the last
             `decay_fraction` of the run (warmup-stable-decay).
  restarts : the Complexity-Deep schedule (paper 6.1): at each of `restart_steps` the rate
             warms up again and a new cosine cycle runs until the next restart (or the end).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_ratio: float = 0.1) -> float:
    """Linear warmup from ~0 to 1 over `warmup_steps`, then cosine decay to `min_ratio` at
    `total_steps` (held there after)."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_stable_decay(step: int, warmup_steps: int, total_steps: int, min_ratio: float,
                        decay_fraction: float) -> float:
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_start = total_steps - max(1, round(decay_fraction * total_steps))
    if step < decay_start:
        return 1.0
    progress = min(1.0, (step - decay_start + 1) / max(1, total_steps - decay_start))
    return 1.0 - (1.0 - min_ratio) * progress


def warm_restarts(step: int, warmup_steps: int, total_steps: int, min_ratio: float,
                  restart_steps: Sequence[int]) -> float:
    starts = [0, *[s for s in restart_steps if 0 < s < total_steps]]
    cycle = bisect.bisect_right(starts, step) - 1
    begin = starts[cycle]
    end = starts[cycle + 1] if cycle + 1 < len(starts) else total_steps
    return warmup_cosine(step - begin, warmup_steps, end - begin, min_ratio)


def lr_multiplier(step: int, cfg) -> float:
    """The multiplier of `cfg.lr` at `step` for a TrainConfig."""
    if cfg.schedule == "wsd":
        return warmup_stable_decay(step, cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio,
                                   cfg.decay_fraction)
    if cfg.schedule == "restarts":
        return warm_restarts(step, cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio,
                             cfg.restart_steps)
    return warmup_cosine(step, cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio)


def describe_lrs(cfg, first: int, last: int) -> str:
    """The learning rates of steps first..last (counted from 1, as in metrics.jsonl, whose
    step s ran at multiplier(s - 1)) at their start, middle and end:
    '3.00e-03 at step 5, 1.65e-03 at step 7, 3.00e-04 at step 8'."""
    points = dict.fromkeys((first, (first + last) // 2, last))  # ordered, no repeats
    return ", ".join(f"{cfg.lr * lr_multiplier(s - 1, cfg):.2e} at step {s}" for s in points)
