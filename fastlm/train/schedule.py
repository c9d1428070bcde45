"""Learning-rate schedules: a pure function of the step, so resuming needs only the step.

Every schedule starts with `warmup` steps of linear warmup from lr/warmup to lr, then:

  cosine    half a cosine from lr down to min_lr at step `total` (min_lr after it)
  linear    a straight line from lr down to min_lr at `total`
  constant  lr until the end
  wsd       warmup-stable-decay (Hägele et al. 2024): lr until the last `decay_fraction` of the
            steps, then a straight line down to min_lr at `total`; a run can be extended from
            any checkpoint in the stable phase by changing only `total`
"""
from __future__ import annotations

import math

SCHEDULES = ("cosine", "linear", "constant", "wsd")


def lr_at(step: int, *, lr: float, min_lr: float, warmup: int, total: int,
          schedule: str = "cosine", decay_fraction: float = 0.2) -> float:
    """Learning rate of optimizer step `step` (0-based) of `total`."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
    if step < warmup:
        return lr * (step + 1) / warmup
    if schedule == "constant" or total <= warmup:
        return lr
    if schedule == "wsd":
        decay_start = max(warmup, total - round(decay_fraction * total))
        if step < decay_start:
            return lr
        progress = min(1.0, (step - decay_start) / max(1, total - decay_start))
        return lr + (min_lr - lr) * progress
    progress = min(1.0, (step - warmup) / (total - warmup))
    if schedule == "linear":
        return lr + (min_lr - lr) * progress
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))
