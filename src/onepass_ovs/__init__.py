"""onepass_ovs: open-vocabulary semantic segmentation in one CLIP pass.

>>> from onepass_ovs import Segmenter
>>> seg = Segmenter.from_pretrained("demo")
>>> result = seg.segment("scene.png", ["red circle", "blue square", "background"])
"""

__version__ = "0.1.0"

from .hub import ModelNotAvailableError, list_models
from .result import SegmentationResult
from .segmenter import Segmenter

__all__ = ["Segmenter", "SegmentationResult", "list_models", "ModelNotAvailableError", "__version__"]
