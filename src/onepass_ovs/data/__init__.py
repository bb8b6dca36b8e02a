"""Labelled segmentation data, shared by training and evaluation.

- :mod:`~onepass_ovs.data.classes`: class lists (``classes.txt``, synonyms, unseen names)
  and :class:`DatasetError`;
- :mod:`~onepass_ovs.data.files`: reading images and masks, writing masks (the label rule);
- :mod:`~onepass_ovs.data.datasets`: :class:`FolderDataset`, :class:`CocoStuffDataset`,
  :class:`RegionDataset` and the per-sample seeding they use;
- :mod:`~onepass_ovs.data.batching`: :func:`collate`, :func:`semantic_to_instances`.

Importing this package is cheap (no torch, numpy or PIL): :data:`IGNORE_INDEX` is defined
here and every other name is imported from its module on first access.
"""

from __future__ import annotations

from .._lazy import lazy_exports

#: In-memory label value of an unlabelled pixel, shared by every label map, loss and
#: metric in the library (see :mod:`onepass_ovs.data.files` for the rule on disk).
IGNORE_INDEX = -1

_LAZY = {
    "classes": (
        "DatasetError",
        "check_class_names",
        "class_synonyms",
        "read_class_names",
        "resolve_unseen",
    ),
    "files": ("IMAGE_EXTENSIONS", "read_image", "read_label", "save_label_png"),
    "datasets": (
        "COCO_STUFF_CLASSES",
        "COCO_STUFF_UNSEEN",
        "CocoStuffDataset",
        "FolderDataset",
        "RegionDataset",
        "sample_generator",
        "sample_seed",
    ),
    "batching": ("collate", "semantic_to_instances"),
}
__getattr__, __dir__, _NAMES = lazy_exports(__name__, globals(), _LAZY)
__all__ = ["IGNORE_INDEX", *_NAMES]
