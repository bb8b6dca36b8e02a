"""The shapes world: a CPU-sized open-vocabulary segmentation benchmark (docs/shapes_world.md).

- :mod:`~onepass_ovs.toy.scenes`: rendered scenes, exact label maps, captions.
- :mod:`~onepass_ovs.toy.export`: scenes written as a dataset folder.
- :mod:`~onepass_ovs.toy.clip`: a tiny open_clip model pretrained on captions
  (not imported here, so rendering scenes needs only numpy and pillow).
"""

from . import scenes as _scenes
from .export import export_folder
from .scenes import *  # noqa: F403 (the public names are scenes.__all__)

__all__ = [*_scenes.__all__, "export_folder"]
