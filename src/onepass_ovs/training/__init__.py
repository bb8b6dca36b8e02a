"""Training: the engine, augmentation, matching, losses and DeOP's three training stages.

Datasets and ``IGNORE_INDEX`` live in :mod:`onepass_ovs.data` (shared with evaluation).
The engine is split by concern: :mod:`.config` (:class:`TrainConfig`), :mod:`.schedule`
(lr schedule), :mod:`.optim` (parameter groups, optimizer), :mod:`.sampling` (seeds and
data order), :mod:`.checkpoints` (atomic safetensors checkpoints) and :mod:`.trainer`
(:class:`Trainer`, the loop).

Importing this package is cheap: it pulls in neither scipy (needed only when a
:class:`HungarianMatcher` runs) nor any model code; the names below are imported
from their modules on first access.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "config": ("TrainConfig",),
    "trainer": ("Trainer",),
    "checkpoints": ("find_latest_checkpoint", "list_checkpoints", "load_model_weights"),
    "augment": (
        "CLIP_MEAN_RGB",
        "ColorJitter",
        "RegionCrop",
        "SegmentationAugment",
        "deop_train_augment",
        "proposal_train_augment",
        "region_crop",
    ),
    "matcher": ("HungarianMatcher",),
    "losses": ("SetCriterion", "assembled_map_loss", "dice_loss", "sigmoid_focal_loss"),
    "stages": ("default_config", "train_deop", "train_prompt", "train_proposals"),
}
_NAME_TO_MODULE = {name: module for module, names in _LAZY.items() for name in names}

__all__ = sorted(_NAME_TO_MODULE)


def __getattr__(name: str) -> Any:
    module = _NAME_TO_MODULE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
