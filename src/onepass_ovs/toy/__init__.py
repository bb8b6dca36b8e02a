"""The shapes world: a CPU-sized open-vocabulary segmentation benchmark (docs/shapes_world.md).

- :mod:`~onepass_ovs.toy.scenes`: rendered scenes, exact label maps, captions.
- :mod:`~onepass_ovs.toy.export`: scenes written as a dataset folder.
- :mod:`~onepass_ovs.toy.clip`: a tiny open_clip model pretrained on captions
  (not imported here, so rendering scenes needs only numpy and pillow).
"""

from .export import export_folder
from .scenes import (
    CLASS_NAMES,
    COLOURS,
    IGNORE_INDEX,
    SEEN_CLASSES,
    SHAPES,
    UNSEEN_CLASSES,
    Scene,
    SceneBatch,
    render_scene,
    render_scenes,
    training_label,
)

__all__ = [
    "CLASS_NAMES",
    "COLOURS",
    "IGNORE_INDEX",
    "SEEN_CLASSES",
    "SHAPES",
    "UNSEEN_CLASSES",
    "Scene",
    "SceneBatch",
    "export_folder",
    "render_scene",
    "render_scenes",
    "training_label",
]
