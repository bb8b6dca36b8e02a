"""Stage 1: learned prompt context (CoOp) on crops of single ground-truth regions.

Each sample is one region of one image (:class:`~onepass_ovs.data.RegionDataset`)
cut out with :class:`~onepass_ovs.training.augment.RegionCrop` (background painted with
CLIP's mean colour, random resized crop to CLIP's input size, flip). The loss is the
cross entropy of ``logit_scale * cos(CLIP image embedding, text embeddings)`` over the
seen classes; only ``text.prompt_context`` trains (the text becomes
``[SOS] ctx_1..ctx_M <class name>. [EOS]``).
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...data import IGNORE_INDEX, RegionDataset
from ...models.preprocessing import normalise
from ...segmenter import Segmenter
from ...text import parse_vocabulary
from ..augment import RegionCrop
from ..config import TrainConfig
from ._common import (
    StageModel,
    check_dataset,
    clip_input_size,
    default_config,
    deop_model,
    logger,
    rebuild,
    seeded_init,
    seen_classes,
    train_and_save,
)

DEFAULT_PROMPT_LENGTH = 16  # the paper's; capped at a quarter of the text context
# CoOp: the learned context replaces the template; only the class name and "." follow it.
COOP_TEMPLATE = "{}."


class PromptStage(StageModel):
    """Frozen CLIP image tower, text tower with trainable context vectors.

    ``forward(images (B, 3, S, S) in [0, 1], class_ids (B,) dataset ids)`` ->
    ``{"loss": cross entropy, "accuracy": top-1 over the seen classes}``.
    """

    def __init__(self, model: nn.Module, class_names: list[str], lookup: torch.Tensor):
        super().__init__(model, trainable=["text.prompt_context"])
        self.class_names = list(class_names)
        self.register_buffer("label_lookup", lookup, persistent=False)

    def forward(self, images: torch.Tensor, class_ids: torch.Tensor) -> dict:
        config = self.model.config
        pre = config.preprocess
        with torch.no_grad():  # the image tower is frozen: no activations kept
            image_emb = self.clip_visual.global_embedding(
                normalise(images, pre.clip_mean, pre.clip_std, None)
            )
            image_emb = F.normalize(image_emb.float(), dim=-1)
        text_emb = self.text(self.class_names)  # (K, E), with grad through the context
        logits = config.family_config.anchors.logit_scale * image_emb @ text_emb.float().t()
        target = self.label_lookup[class_ids]
        loss = F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX)
        accuracy = (logits.argmax(-1) == target).float().mean()
        return {"loss": loss, "accuracy": accuracy.detach()}


def default_prompt_length(config) -> int:
    """16 (the paper's), or a quarter of a shorter text context (4 for the tiny preset)."""
    context = config.clip.model_cfg.get("text_cfg", {}).get("context_length", 77)
    return max(1, min(DEFAULT_PROMPT_LENGTH, context // 4))


def check_prompts_fit(model: nn.Module, class_names: list[str]) -> None:
    """Every class prompt plus the context vectors must fit the text context length."""
    text = model.text
    context = text.positional_embedding.shape[0]
    length = text.prompt_context.shape[0] if text.prompt_context is not None else 0
    synonyms = [name for entry in parse_vocabulary(class_names) for name in entry]
    prompts = [template.format(name) for name in synonyms for template in text.templates]
    tokens = (text.tokenizer(prompts) != 0).sum(-1)  # SOT + words + EOT
    longest = int(tokens.max())
    if longest + length > context:
        worst = prompts[int(tokens.argmax())]
        raise ValueError(
            f"the prompt {worst!r} takes {longest} tokens; with {length} context vectors "
            f"it exceeds the text context of {context} tokens: use a smaller prompt length"
        )


def add_prompt_context(
    segmenter: Segmenter,
    prompt_length: int = DEFAULT_PROMPT_LENGTH,
    *,
    template: str = COOP_TEMPLATE,
    seed: int = 0,
) -> Segmenter:
    """A segmenter whose text encoder has ``prompt_length`` learned context vectors.

    The config changes (``text.prompt_length``, and ``text.templates = [template]``),
    so the model is rebuilt from it and every other weight is carried over. Returns the
    segmenter unchanged when it already has a context of that length.
    """
    model = deop_model(segmenter)
    if prompt_length < 1:
        raise ValueError(f"prompt_length must be >= 1, got {prompt_length}")
    current = model.config.text.prompt_length
    if current == prompt_length:
        return segmenter
    if current:
        logger.warning(
            "replacing the model's %d learned prompt vectors by %d new ones", current, prompt_length
        )
    config = model.config.replace(
        **{"text.prompt_length": prompt_length, "text.templates": [template]}
    )
    seeded_init(seed, "prompt_context")
    return Segmenter(rebuild(model, config), device=segmenter.device)


def train_prompt(
    segmenter: Segmenter,
    dataset: Any,
    config: TrainConfig | None = None,
    *,
    prompt_length: int | None = None,
    crop_size: int | None = None,
    min_region_pixels: int = 64,
    augment=None,
    resume: bool | str | os.PathLike = False,
) -> Segmenter:
    """Learn the prompt context on region crops of ``dataset``'s seen classes.

    Args:
        segmenter: a DeOP segmenter; without learned context (``prompt_length`` 0) one
            of ``prompt_length`` vectors is added first (:func:`add_prompt_context`;
            default 16, or a quarter of a shorter text context).
        dataset: a :class:`~onepass_ovs.data.FolderDataset` (unseen classes
            already ignored; one sample per region of >= ``min_region_pixels`` pixels)
            or a ready :class:`~onepass_ovs.data.RegionDataset`.
        config: a :class:`TrainConfig`; default ``default_config("prompt")`` (SGD lr 0.02,
            wd 5e-4, cosine, 16k steps, batch 32). ``config.output_dir`` receives the
            trained model.
        crop_size: side of the region crops; default CLIP's input size.
        augment: replaces the ``RegionCrop`` sample transform.
        resume: ``False``, ``"auto"`` / ``True`` or a checkpoint folder (see ``Trainer.fit``).

    Returns a Segmenter around the trained model (also saved to ``config.output_dir``).
    """
    config = config or default_config("prompt")
    regions = dataset if isinstance(dataset, RegionDataset) else None
    base = regions.dataset if regions is not None else dataset
    check_dataset(base)
    if regions is None:
        regions = RegionDataset(base, min_pixels=min_region_pixels)
    elif regions.transform is not None:
        raise ValueError("leave the RegionDataset's transform unset: the stage crops itself")
    if len(regions) == 0:
        raise ValueError(f"no labelled region of >= {min_region_pixels} pixels in the dataset")

    model = deop_model(segmenter)
    length = prompt_length or model.config.text.prompt_length or default_prompt_length(model.config)
    segmenter = add_prompt_context(segmenter, length, seed=config.seed)
    model = segmenter.model
    names, lookup = seen_classes(base)
    check_prompts_fit(model, names)
    crop = augment or RegionCrop(crop_size or clip_input_size(model.config))
    return train_and_save(
        "prompt", model, lambda: PromptStage(model, names, lookup), regions, config,
        sample_transform=crop, resume=resume,
        record={
            "classes": names,
            "unseen": [base.classes[i] for i in base.unseen_ids],
            "prompt_length": length,
            "crop_size": getattr(crop, "size", None),
            "regions": len(regions),
        },
    )
