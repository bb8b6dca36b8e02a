"""Stage 2: the MaskFormer proposal generator, trained by bipartite matching.

Each query's class embedding is classified by cosine against the (frozen) text
embeddings of the dataset's seen classes plus a learned "no object" embedding
(:class:`~onepass_ovs.models.proposals.ProposalClassifier`); queries are matched to the
ground-truth class masks (Hungarian: class 1, mask focal 20, dice 1) and trained with
cross entropy (no-object weight 0.1) + focal x20 + dice x1 on every decoder layer (deep
supervision). Unseen classes are ignore pixels and never a target.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from ...data import semantic_to_instances
from ...models.preprocessing import normalise
from ...models.proposals import ProposalClassifier
from ...segmenter import Segmenter
from ..augment import proposal_train_augment
from ..config import TrainConfig
from ..losses import SetCriterion
from ..matcher import HungarianMatcher
from ._common import (
    StageModel,
    default_config,
    deop_model,
    frozen_text_embeddings,
    prepare_stage,
    seeded_init,
    seen_record,
    train_and_save,
)


def default_proposal_crop(config) -> int:
    """1.25 x the inference short side, on the padding grid (640 for short side 512)."""
    multiple = config.preprocess.pad_multiple
    return max(multiple, round(1.25 * config.preprocess.short_side / multiple) * multiple)


class ProposalStage(StageModel):
    """Trainable proposal generator + no-object embedding; frozen text embeddings.

    ``forward(images (B, 3, S, S) in [0, 1], labels (B, S, S) dataset ids)`` -> the
    :class:`SetCriterion` terms (``loss``, ``loss_ce``, ``loss_focal``, ``loss_dice``,
    and ``*_i`` per auxiliary decoder layer).
    """

    def __init__(
        self,
        model: nn.Module,
        class_names: list[str],
        lookup: torch.Tensor,
        *,
        cost_class: float = 1.0,
        cost_mask: float = 20.0,
        cost_dice: float = 1.0,
        eos_coef: float = 0.1,
        weight_ce: float = 1.0,
        weight_focal: float = 20.0,
        weight_dice: float = 1.0,
    ):
        super().__init__(model, trainable=["proposals", "proposal_classifier"])
        self.class_names = list(class_names)
        self.proposal_classifier = ProposalClassifier(model.embed_dim)
        self.criterion = SetCriterion(
            len(class_names),
            HungarianMatcher(cost_class, cost_mask, cost_dice),
            eos_coef=eos_coef,
            weight_ce=weight_ce,
            weight_focal=weight_focal,
            weight_dice=weight_dice,
        )
        text = frozen_text_embeddings(model, class_names)
        self.register_buffer("text_embeddings", text, persistent=False)  # (K, E)
        self.register_buffer("label_lookup", lookup, persistent=False)

    def predict(self, images: torch.Tensor) -> dict:
        """Proposal outputs in the criterion's format (``class_logits`` (B, N, K+1), ...)."""
        pre = self.model.config.preprocess
        out = self.proposals(normalise(images, pre.mean, pre.std, None))

        def level(o: dict) -> dict:
            logits = self.proposal_classifier(o["query_embeddings"], self.text_embeddings)
            return {"class_logits": logits, "mask_logits": o["mask_logits"]}

        return {**level(out), "aux_outputs": [level(o) for o in out["aux"]]}

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> dict:
        outputs = self.predict(images)
        targets = []
        for label in self.label_lookup[labels]:
            classes, masks = semantic_to_instances(label)
            targets.append({"labels": classes, "masks": masks})
        return self.criterion(outputs, targets)


def train_proposals(
    segmenter: Segmenter,
    dataset: Any,
    config: TrainConfig | None = None,
    *,
    crop_size: int | None = None,
    augment=None,
    resume: bool | str | os.PathLike = False,
    **loss_options: float,
) -> Segmenter:
    """Train the proposal generator on ``dataset``'s seen classes.

    Args:
        segmenter: a DeOP segmenter; only ``proposals.*`` changes.
        dataset: a :class:`~onepass_ovs.data.FolderDataset` (or COCO-Stuff) built
            with ``unseen=...`` for the open-vocabulary protocol.
        config: default ``default_config("proposals")`` (AdamW 1e-4, wd 1e-4, poly,
            backbone lr x0.1, grad-norm clip 0.01, 60k steps, batch 32).
        crop_size: training crops are ``crop_size`` square (short side drawn from
            0.5x..1.5x of it, colour jitter, flip); default 1.25 x the model's inference
            short side (640 for 512).
        augment: replaces that sample transform (``aug(sample, generator)``).
        loss_options: ``cost_class``, ``cost_mask``, ``cost_dice``, ``eos_coef``,
            ``weight_ce``, ``weight_focal``, ``weight_dice`` (defaults 1, 20, 1, 0.1, 1,
            20, 1).

    Returns a Segmenter around the trained model (also saved to ``config.output_dir``).
    The learned no-object embedding is part of the checkpoints, not of the saved model
    (DeOP does not use the proposals' class head at inference).
    """
    config = config or default_config("proposals")
    model, size, names, lookup = prepare_stage(
        segmenter, dataset, crop_size, deop_model, default_crop=default_proposal_crop
    )

    def make_stage():  # called under train_and_save's requires_grad guard
        seeded_init(config.seed, "proposal_classifier")
        return ProposalStage(model, names, lookup, **loss_options)

    return train_and_save(
        "proposals", model, make_stage, dataset, config,
        sample_transform=augment or proposal_train_augment(size), resume=resume,
        record={
            **seen_record(names, dataset, size),
            "loss_options": loss_options,
        },
    )
