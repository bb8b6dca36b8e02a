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

from .._lazy import lazy_exports

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
    "stages": ("default_config", "train_deop", "train_gkc", "train_prompt", "train_proposals"),
}
__getattr__, __dir__, _NAMES = lazy_exports(__name__, globals(), _LAZY)
__all__ = _NAMES
