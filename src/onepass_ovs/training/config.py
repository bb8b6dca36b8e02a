"""The hyperparameters of one training run (:class:`TrainConfig`), JSON-serialisable.

Pure python: importing this module pulls in no torch.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["BOOKKEEPING_FIELDS", "DEFAULT_NO_DECAY", "TrainConfig"]

#: Name fragments whose parameters get no weight decay (see
#: :func:`~onepass_ovs.training.optim.param_groups`).
DEFAULT_NO_DECAY: tuple[str, ...] = ("norm", "bias", "embedding", "embed", "pos")

#: Config fields that do not change the trajectory: changing them on resume is routine.
BOOKKEEPING_FIELDS = frozenset(
    {"log_every", "checkpoint_every", "keep_checkpoints", "num_workers", "output_dir",
     "device", "progress_bar"}
)  # fmt: skip


@dataclass
class TrainConfig:
    """Hyperparameters of one training run; JSON-serialisable (see :meth:`to_dict`).

    Batch arithmetic: one optimizer step consumes ``batch_size * grad_accum_steps``
    samples on each of ``world_size`` processes, i.e. a global batch of
    ``batch_size * grad_accum_steps * world_size``.
    """

    steps: int = 1000
    """Number of optimizer steps; also the horizon of the lr schedule."""
    batch_size: int = 8
    """Samples per process per micro-step (one forward/backward)."""
    lr: float = 1e-4
    """Base learning rate (before per-group multipliers and the schedule)."""
    weight_decay: float = 1e-4
    optimizer: str = "adamw"
    """"adamw" (decoupled decay) or "sgd" (L2 decay, ``momentum``)."""
    betas: tuple[float, float] = (0.9, 0.999)
    momentum: float = 0.9
    eps: float = 1e-8
    lr_schedule: str = "poly"
    """"poly" ``(1 - t/T) ** poly_power``, "cosine" or "constant"; see
    :func:`~onepass_ovs.training.schedule.lr_factor`."""
    poly_power: float = 0.9
    min_lr_ratio: float = 0.0
    """Floor of the schedule as a fraction of the base lr (poly and cosine)."""
    warmup_steps: int = 0
    """Linear warmup multiplied onto the schedule: factor ``(step + 1) / warmup_steps``."""
    lr_multipliers: dict[str, float] = field(default_factory=dict)
    """Module-name prefix -> lr multiplier, e.g. ``{"backbone": 0.1}``; longest prefix wins."""
    no_decay: tuple[str, ...] = DEFAULT_NO_DECAY
    """Name fragments exempt from weight decay, on top of norm/embedding modules and biases."""
    grad_clip_norm: float | None = None
    """Clip the global gradient L2 norm to this value (the paper's 0.01); None = off."""
    amp: str = "none"
    """"none" or "bf16" (``torch.autocast`` around ``loss_fn``; no grad scaler needed)."""
    grad_accum_steps: int = 1
    log_every: int = 20
    checkpoint_every: int = 1000
    """Save every this many steps (and always after the last step); 0 = last step only."""
    keep_checkpoints: int | None = 3
    """Keep only the newest this many checkpoints; None keeps all."""
    save_frozen_params: bool = True
    """False leaves ``requires_grad=False`` parameters (e.g. a frozen CLIP) out of
    checkpoints; the caller must then rebuild them identically before resuming."""
    seed: int = 0
    num_workers: int = 2
    output_dir: str = "runs/train"
    device: str | None = None
    """None = ``cuda:<LOCAL_RANK>`` when available, else CPU."""
    find_unused_parameters: bool = False
    """Passed to DDP; needed when some trainable parameters get no gradient in a step."""
    progress_bar: bool = True

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)  # JSON round-trips tuples as lists
        self.no_decay = tuple(self.no_decay)
        self.lr_multipliers = dict(self.lr_multipliers)
        for name in ("steps", "batch_size", "grad_accum_steps", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.checkpoint_every < 0 or self.warmup_steps < 0 or self.num_workers < 0:
            raise ValueError("checkpoint_every, warmup_steps and num_workers must be >= 0")
        if self.keep_checkpoints is not None and self.keep_checkpoints < 1:
            raise ValueError("keep_checkpoints must be >= 1 or None")
        if self.optimizer not in ("adamw", "sgd"):
            raise ValueError(f"optimizer must be 'adamw' or 'sgd', got {self.optimizer!r}")
        if self.lr_schedule not in ("poly", "cosine", "constant"):
            raise ValueError(f"unknown lr_schedule {self.lr_schedule!r}")
        if self.amp not in ("none", "bf16"):
            raise ValueError(f"amp must be 'none' or 'bf16', got {self.amp!r}")
        if self.grad_clip_norm is not None and self.grad_clip_norm <= 0:
            raise ValueError("grad_clip_norm must be > 0 or None")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-compatible dict (tuples become lists)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> TrainConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise (they are usually typos)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise TypeError(f"unknown TrainConfig fields: {unknown}")
        return cls(**values)
