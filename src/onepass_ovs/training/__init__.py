"""Training: datasets, augmentation, matching, losses and DeOP's three training stages.

Importing this package is cheap: it pulls in neither scipy (needed only when a
:class:`HungarianMatcher` runs) nor any model code; the names below are imported
from their modules on first access.
"""

from __future__ import annotations

import importlib
from typing import Any

# In-memory label value of an unlabelled pixel, shared by every label map, loss and
# metric in the library (see ``onepass_ovs.training.data`` for the file rule).
IGNORE_INDEX = -1

_LAZY = {
    "data": (
        "COCO_STUFF_CLASSES",
        "COCO_STUFF_UNSEEN",
        "CocoStuffDataset",
        "DatasetError",
        "FolderDataset",
        "RegionDataset",
        "collate",
        "read_class_names",
        "read_image",
        "read_label",
        "save_label_png",
        "semantic_to_instances",
    ),
    "augment": (
        "CLIP_MEAN_RGB",
        "ColorJitter",
        "RegionCrop",
        "SegmentationAugment",
        "deop_train_augment",
        "proposal_train_augment",
        "region_crop",
        "sample_generator",
        "sample_seed",
    ),
    "matcher": ("HungarianMatcher",),
    "losses": ("SetCriterion", "assembled_map_loss", "dice_loss", "sigmoid_focal_loss"),
    "stages": ("default_config", "train_deop", "train_prompt", "train_proposals"),
}
_NAME_TO_MODULE = {name: module for module, names in _LAZY.items() for name in names}

__all__ = ["IGNORE_INDEX", *sorted(_NAME_TO_MODULE)]


def __getattr__(name: str) -> Any:
    module = _NAME_TO_MODULE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
