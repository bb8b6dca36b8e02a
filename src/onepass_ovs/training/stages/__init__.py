"""The training stages (docs/training.md, docs/sed.md, docs/gkc.md), each a function and an
``ovs-train`` command:

=============  ============================  ===========================================
stage          function                      trains
=============  ============================  ===========================================
``prompt``     :func:`train_prompt`          the learned prompt context (CoOp)
``proposals``  :func:`train_proposals`       the MaskFormer proposal generator
``deop``       :func:`train_deop`            CAL, learned positions, void embedding
``sed``        :func:`train_sed`             SED's decoder and CLIP image tower (x 0.01)
``gkc``        :func:`train_gkc`             a whole GKC model (its text tower frozen)
=============  ============================  ===========================================

The first three are DeOP's, run in that order; ``sed`` trains a SED model in one stage.

Each takes ``(segmenter, dataset, config)`` and returns a :class:`~onepass_ovs.Segmenter`;
``config.output_dir`` ends as a pretrained folder (``config.json`` +
``model.safetensors``) with the run (log, checkpoints) under ``training/``.
"""

from ._common import STAGE_DEFAULTS, STAGES, default_config, load_clip_weights
from .deop import train_deop
from .gkc import train_gkc
from .prompt import add_prompt_context, train_prompt
from .proposals import train_proposals
from .sed import sed_default_config, train_sed

__all__ = [
    "STAGES",
    "STAGE_DEFAULTS",
    "add_prompt_context",
    "default_config",
    "load_clip_weights",
    "sed_default_config",
    "train_deop",
    "train_gkc",
    "train_prompt",
    "train_proposals",
    "train_sed",
]
