"""The learning-rate schedule: warmup times poly / cosine / constant, as a ``LambdaLR``.

:func:`lr_factor` is the closed form; :func:`build_lr_scheduler` hands it to torch's
``LambdaLR``, which sets every group's ``lr`` to ``initial_lr * lr_factor(step)`` before
optimizer step ``step``. The factor is a pure function of the step, so a resumed run
rebuilds the scheduler at its step (``last_epoch``) and gets the same lrs bit for bit.
"""

from __future__ import annotations

import functools
import math

import torch

from .config import TrainConfig

__all__ = ["build_lr_scheduler", "lr_factor"]


def lr_factor(step: int, config: TrainConfig) -> float:
    """Multiplier of each group's base lr for the update from ``step`` to ``step + 1``.

    ``step`` runs over ``[0, config.steps)``; with ``t = step / steps``:
    poly ``(1 - t) ** poly_power``, cosine ``(1 + cos(pi t)) / 2``, constant 1, then
    ``min_lr_ratio + (1 - min_lr_ratio) * f``, times ``(step + 1) / warmup_steps`` while
    ``step < warmup_steps`` (the warmup multiplies the schedule, it does not delay it).
    """
    progress = min(max(step / config.steps, 0.0), 1.0)
    if config.lr_schedule == "poly":
        factor = (1.0 - progress) ** config.poly_power
    elif config.lr_schedule == "cosine":
        factor = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        factor = 1.0
    if config.lr_schedule != "constant":
        factor = config.min_lr_ratio + (1.0 - config.min_lr_ratio) * factor
    if step < config.warmup_steps:
        factor *= (step + 1) / config.warmup_steps
    return factor


def build_lr_scheduler(
    optimizer: torch.optim.Optimizer, config: TrainConfig, step: int = 0
) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` of :func:`lr_factor`, positioned before optimizer step ``step``.

    Each group's ``base_lr`` (set by :func:`~onepass_ovs.training.optim.param_groups`,
    after multipliers) is what the schedule scales; it becomes the group's
    ``initial_lr``. On return every group's ``lr`` is ``base_lr * lr_factor(step)``;
    call ``scheduler.step()`` after each ``optimizer.step()``.
    """
    for group in optimizer.param_groups:
        group["initial_lr"] = group["base_lr"]
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, functools.partial(lr_factor, config=config), last_epoch=step - 1
    )
