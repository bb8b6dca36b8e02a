"""Training SED (docs/methods.md section 3): the decoder and, at lr x 0.01, the CLIP image tower.

From the command line (docs/sed.md)::

    ovs-train sed --data DIR --model sed-convnext-b \
        --clip convnext_base_w_320/laion_aesthetic_s13b_b82k --output runs/sed --unseen "cow,tree"

or from Python::

    from onepass_ovs.training.stages import load_clip_weights, sed_default_config, train_sed
    seg = Segmenter.from_config("sed-convnext-b")
    load_clip_weights(seg, "convnext_base_w_320/laion_aesthetic_s13b_b82k")
    train_sed(seg, FolderDataset(root, unseen=[...]), sed_default_config(output_dir="runs/sed"))

Recipe (the authors'): AdamW 2e-4, weight decay 1e-4 (none on norms and biases), cosine
schedule without warmup, 80k steps, batch 4, grad-norm clip 0.01 on the whole model; the
whole CLIP image tower at lr x 0.01, the text tower frozen. Square crops (short side
resized to the crop, random crop, colour jitter, flip). Loss: four equal BCE-with-logits
terms (final logits and the three auxiliary heads), each output bilinearly upsampled to the
label map, one-hot targets, mean over pixels x classes; ignore pixels are not masked, they
get all-zero targets (as the reference). The auxiliary heads read detached features
(inside the model), so CLIP gets gradient only through the cost map.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...data import IGNORE_INDEX
from ...segmenter import Segmenter
from ..augment import ColorJitter, SegmentationAugment
from ..config import TrainConfig
from ._common import (
    STAGE_DEFAULTS,
    StageModel,
    default_config,
    family_model,
    frozen_text_embeddings,
    prepare_stage,
    seen_record,
    train_and_save,
)

SED_DEFAULTS: dict[str, Any] = STAGE_DEFAULTS["sed"]
TRAINABLE = ("clip_visual", "decoder")
# The reference caps the long side at 2666 for a 768 short side.
_LONG_SIDE_RATIO = 2666 / 768


def sed_default_config(**overrides: Any) -> TrainConfig:
    """The paper's :class:`TrainConfig` for SED with ``overrides`` applied (lr multipliers
    are merged into the default ``{"clip_visual": 0.01}``); ``default_config("sed", ...)``."""
    return default_config("sed", **overrides)


def sed_train_augment(crop_size: int = 768) -> SegmentationAugment:
    """Short side resized to the crop (long side capped at 2666/768 of it), random
    ``crop_size`` square crop, colour jitter, horizontal flip."""
    return SegmentationAugment(
        crop_size,
        short_side=(crop_size, crop_size),
        max_long_side=round(crop_size * _LONG_SIDE_RATIO),
        color_jitter=ColorJitter(),
    )


def sed_loss(
    logits: torch.Tensor, aux_logits: list[torch.Tensor], labels: torch.Tensor
) -> dict[str, torch.Tensor]:
    """logits (B, K, h, w), aux_logits [(B, K, h_i, w_i)] x 3, labels (B, S, S) indices
    into the K classes or ``IGNORE_INDEX`` -> ``{"loss", "loss_final", "loss_aux0..2"}``."""
    classes = logits.shape[1]
    size = labels.shape[-2:]
    valid = labels != IGNORE_INDEX
    target = F.one_hot(labels.clamp_min(0), classes).permute(0, 3, 1, 2).float()
    target = target * valid.unsqueeze(1)  # ignore pixels: all-zero targets, not masked
    terms = {}
    for name, out in (("loss_final", logits), *((f"loss_aux{i}", a) for i, a in enumerate(aux_logits))):
        up = F.interpolate(out.float(), size=size, mode="bilinear", align_corners=False)
        terms[name] = F.binary_cross_entropy_with_logits(up, target)
    return {"loss": sum(terms.values()), **terms}


class SedStage(StageModel):
    """SED with a frozen text tower and precomputed per-template text embeddings.

    ``forward(images (B, 3, S, S) in [0, 1], labels (B, S, S) dataset ids)`` -> the terms
    of :func:`sed_loss`.
    """

    def __init__(self, model: nn.Module, class_names: list[str], lookup: torch.Tensor):
        super().__init__(model, trainable=TRAINABLE)
        self.class_names = list(class_names)
        text = frozen_text_embeddings(model, class_names)  # (K, P, E)
        self.register_buffer("text_embeddings", text, persistent=False)
        self.register_buffer("label_lookup", lookup, persistent=False)

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> dict:
        out = self.model(images, self.text_embeddings)
        return sed_loss(out["logits"], out["aux_logits"], self.label_lookup[labels])


def _sed_model(segmenter: Segmenter) -> nn.Module:
    return family_model(segmenter, "sed", "train_sed trains")


def train_sed(
    segmenter: Segmenter,
    dataset: Any,
    config: TrainConfig | None = None,
    *,
    crop_size: int | None = None,
    augment=None,
    resume: bool | str | os.PathLike = False,
) -> Segmenter:
    """Train SED's decoder and CLIP image tower on ``dataset``'s seen classes.

    Args:
        segmenter: a SED segmenter (its CLIP initialised from an open_clip ConvNeXt CLIP
            with ``model.load_clip_weights``, or a saved SED to fine-tune).
        dataset: a :class:`~onepass_ovs.data.FolderDataset` (or COCO-Stuff), with
            ``unseen=...`` for the open-vocabulary protocol (unseen pixels become ignore).
        config: default :func:`sed_default_config` (the paper's recipe).
        crop_size: square training crops; default the model's short side (768).
        augment: replaces :func:`sed_train_augment` as the sample transform.

    Returns a Segmenter around the trained model (also saved to ``config.output_dir``).
    """
    config = config or sed_default_config()
    model, size, names, lookup = prepare_stage(segmenter, dataset, crop_size, _sed_model)
    return train_and_save(
        "sed", model, lambda: SedStage(model, names, lookup), dataset, config,
        sample_transform=augment or sed_train_augment(size), resume=resume,
        record=seen_record(names, dataset, size),
    )
