"""Learning-rate schedules: the rate of optimizer step k (0-based), as pure functions of k.

The trainer's run config picks one with :func:`lr_at`; the paper experiments
call :func:`step_decay` with milestones given as fractions of their run.
"""

from __future__ import annotations

import math
from typing import Iterable

__all__ = ["cosine", "lr_at", "step_decay", "warmup"]


def step_decay(lr: float, step: int, milestones: Iterable[float], decay: float) -> float:
    """``lr * decay ** n``, n the number of milestones (in steps) that ``step`` has reached."""
    return lr * decay ** sum(step >= m for m in milestones)


def warmup(lr: float, step: int, warmup_steps: int) -> float:
    """Linear warm-up of step ``step < warmup_steps``: lr (step + 1) / (warmup_steps + 1)."""
    return lr * (step + 1) / (warmup_steps + 1)


def cosine(lr: float, step: int, total: int, warmup_steps: int = 0) -> float:
    """Cosine decay from ``lr`` after the warm-up to 0 at step ``total``: lr (1 + cos(pi t)) / 2."""
    t = (step - warmup_steps) / max(1, total - warmup_steps)
    return lr * 0.5 * (1.0 + math.cos(math.pi * t))


def lr_at(cfg, step: int, total: int, steps_per_epoch: int) -> float:
    """The learning rate of optimizer step ``step`` of a run config (a :class:`~lookahead_dist.train.config.Config`):
    warm-up, then constant, step-wise (milestones in steps or epochs) or cosine over ``total`` steps."""
    o = cfg.optim
    if step < o.warmup_steps:
        return warmup(o.lr, step, o.warmup_steps)
    if o.schedule == "step":
        unit = steps_per_epoch if o.milestones_in == "epochs" else 1
        return step_decay(o.lr, step, [m * unit for m in o.milestones], o.decay)
    if o.schedule == "cosine":
        return cosine(o.lr, step, total, o.warmup_steps)
    return o.lr
