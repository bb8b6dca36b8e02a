"""Stage 3: DeOP's heads on top of a frozen proposal generator and a frozen CLIP.

Trainable: CAL (``anchors.*``), the learned positions (``clip_visual.learned_pos.*``),
the void embedding, and optionally the prompt context (``train_prompt``) and the CLIP
image tower (``clip_lr_mult``). The proposal generator is frozen *and* kept in eval mode
(its BatchNorm statistics never move). Loss: :func:`~onepass_ovs.training.losses.
assembled_map_loss` on the assembled map (focal x2 + dice x0.8, ignore pixels -> void),
on exactly S x S crops of the seen classes.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import torch
from torch import nn

from ...segmenter import Segmenter
from ..augment import deop_train_augment
from ..config import TrainConfig
from ..losses import assembled_map_loss
from ._common import (
    StageModel,
    default_config,
    deop_model,
    frozen_text_embeddings,
    prepare_stage,
    seen_record,
    train_and_save,
)

HEADS = ("anchors", "clip_visual.learned_pos", "void_embedding")


class DeopStage(StageModel):
    """DeOP with frozen proposals (eval mode) and frozen text embeddings.

    ``forward(images (B, 3, S, S) in [0, 1], labels (B, S, S) dataset ids)`` ->
    ``{"loss", "loss_focal", "loss_dice"}``.
    """

    def __init__(
        self,
        model: nn.Module,
        class_names: list[str],
        lookup: torch.Tensor,
        *,
        train_prompt: bool = False,
        train_clip: bool = False,
        focal_weight: float = 2.0,
        dice_weight: float = 0.8,
    ):
        trainable = list(HEADS)
        if train_prompt:
            if model.text.prompt_context is None:
                raise ValueError(
                    "train_prompt needs a model with learned prompt context: run the "
                    "prompt stage first (ovs-train prompt)"
                )
            trainable.append("text.prompt_context")
        if train_clip:
            trainable.append("clip_visual")
        super().__init__(model, trainable=trainable)
        self.class_names = list(class_names)
        self.train_prompt = train_prompt
        self.focal_weight = focal_weight
        self.dice_weight = dice_weight
        text = frozen_text_embeddings(model, class_names)
        self.register_buffer("text_embeddings", text, persistent=False)  # (K, E)
        self.register_buffer("label_lookup", lookup, persistent=False)

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> dict:
        text = self.text(self.class_names) if self.train_prompt else self.text_embeddings
        out = self.model(images, text)
        return assembled_map_loss(
            out["mask_logits"],
            out["class_logits"],
            self.label_lookup[labels],
            focal_weight=self.focal_weight,
            dice_weight=self.dice_weight,
        )


def train_deop(
    segmenter: Segmenter,
    dataset: Any,
    config: TrainConfig | None = None,
    *,
    crop_size: int | None = None,
    train_prompt: bool = False,
    clip_lr_mult: float | None = None,
    augment=None,
    resume: bool | str | os.PathLike = False,
    focal_weight: float = 2.0,
    dice_weight: float = 0.8,
) -> Segmenter:
    """Train DeOP's heads on ``dataset``'s seen classes with the proposals frozen.

    Args:
        segmenter: a DeOP segmenter whose proposal generator is trained (stage 2).
        dataset: a :class:`~onepass_ovs.data.FolderDataset` (or COCO-Stuff) built
            with ``unseen=...`` for the open-vocabulary protocol.
        config: default ``default_config("deop")`` (AdamW 2e-4, wd 1e-4 with none on
            norms/embeddings/positions, poly 0.9, grad-norm clip 0.01, 60k steps, batch 16).
        crop_size: crops are exactly ``crop_size`` square (image padded with 128, label
            with ignore); default the model's inference short side (512).
        train_prompt: also train the learned prompt context.
        clip_lr_mult: unfreeze the CLIP image tower with this lr multiplier (default:
            frozen, as the paper); the learned positions keep multiplier 1.
        augment: replaces the ``deop_train_augment(crop_size)`` sample transform.

    Returns a Segmenter around the trained model (also saved to ``config.output_dir``).
    """
    config = config or default_config("deop")
    model, size, names, lookup = prepare_stage(segmenter, dataset, crop_size, deop_model)
    train_clip = bool(clip_lr_mult)
    if train_clip:
        multipliers = {"clip_visual": float(clip_lr_mult), "clip_visual.learned_pos": 1.0}
        names_in_model = {n for n, _ in model.named_parameters()}
        if not any(n.startswith("clip_visual.learned_pos.") for n in names_in_model):
            multipliers.pop("clip_visual.learned_pos")
        config = dataclasses.replace(
            config, lr_multipliers={**multipliers, **config.lr_multipliers}
        )

    def make_stage():  # called under train_and_save's requires_grad guard
        return DeopStage(
            model, names, lookup, train_prompt=train_prompt, train_clip=train_clip,
            focal_weight=focal_weight, dice_weight=dice_weight,
        )  # fmt: skip

    return train_and_save(
        "deop", model, make_stage, dataset, config,
        sample_transform=augment or deop_train_augment(size), resume=resume,
        record={
            **seen_record(names, dataset, size),
            "train_prompt": train_prompt,
            "clip_lr_mult": clip_lr_mult,
        },
    )
