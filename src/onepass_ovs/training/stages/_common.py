"""What the training stages share: defaults, the stage model, running, saving.

A stage trains parts of a model (DeOP's three stages, SED's one) held by a
:class:`~onepass_ovs.Segmenter` with the generic :class:`~onepass_ovs.training.trainer.Trainer`
and writes a normal pretrained folder::

    output_dir/
      config.json  model.safetensors     the trained model (Segmenter.from_pretrained)
      training/                           the run: stage.json, the TrainConfig,
        config.json  stage.json           train_log.jsonl and checkpoints/step_*/
        train_log.jsonl  checkpoints/
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...data import IGNORE_INDEX, collate
from ...segmenter import Segmenter, build_model
from ..checkpoints import list_checkpoints
from ..config import TrainConfig
from ..distributed import barrier
from ..sampling import derive_seed
from ..trainer import Trainer

logger = logging.getLogger("onepass_ovs.training")

STAGES = ("prompt", "proposals", "deop", "sed", "gkc")
RUN_DIR = "training"
CLIP_FAMILIES = ("deop", "sed", "gkc")  # families whose load_clip_weights takes an open_clip CLIP
STAGE_FILE = "stage.json"

# The paper's recipes (docs/training.md). ``batch_size`` is per process: the paper's batch
# is the global one, ``batch_size * grad_accum_steps * world_size``.
STAGE_DEFAULTS: dict[str, dict[str, Any]] = {
    "prompt": {
        "steps": 16_000, "batch_size": 32, "optimizer": "sgd", "lr": 0.02,
        "weight_decay": 5e-4, "momentum": 0.9, "lr_schedule": "cosine",
    },
    "proposals": {
        "steps": 60_000, "batch_size": 32, "optimizer": "adamw", "lr": 1e-4,
        "weight_decay": 1e-4, "lr_schedule": "poly", "poly_power": 0.9,
        "grad_clip_norm": 0.01, "lr_multipliers": {"proposals.backbone": 0.1},
    },
    "deop": {
        "steps": 60_000, "batch_size": 16, "optimizer": "adamw", "lr": 2e-4,
        "weight_decay": 1e-4, "lr_schedule": "poly", "poly_power": 0.9,
        "grad_clip_norm": 0.01,
    },
    # SED (training/stages/sed.py): the whole CLIP image tower at lr x 0.01, text frozen
    "sed": {
        "steps": 80_000, "batch_size": 4, "optimizer": "adamw", "lr": 2e-4,
        "weight_decay": 1e-4, "lr_schedule": "cosine", "grad_clip_norm": 0.01,
        "lr_multipliers": {"clip_visual": 0.01},
    },
    # GKC (Mask2Former's recipe): the released baseline config has lr 3e-4 at batch 112,
    # 50k steps, steps down at 40k/45k; a poly schedule stands in for the steps
    "gkc": {
        "steps": 50_000, "batch_size": 16, "optimizer": "adamw", "lr": 1e-4,
        "weight_decay": 0.05, "lr_schedule": "poly", "poly_power": 0.9,
        "grad_clip_norm": 0.01, "lr_multipliers": {"backbone": 0.1},
    },
}  # fmt: skip


def default_config(stage: str, **overrides: Any) -> TrainConfig:
    """The paper's :class:`TrainConfig` for ``stage``, with ``overrides`` applied.

    >>> default_config("deop", steps=200, output_dir="runs/deop").lr
    0.0002
    """
    if stage not in STAGE_DEFAULTS:
        raise ValueError(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")
    values = {**STAGE_DEFAULTS[stage], **overrides}
    if "lr_multipliers" in overrides:
        # extend the stage's multipliers rather than silently dropping them
        values["lr_multipliers"] = {
            **STAGE_DEFAULTS[stage].get("lr_multipliers", {}),
            **overrides["lr_multipliers"],
        }
    return TrainConfig(**values)


# ----------------------------------------------------------------------------- inputs


def family_model(segmenter: Segmenter, family: str, trainer: str) -> nn.Module:
    """The segmenter's model in float32 (training needs full-precision weights), refusing
    a model of another family than ``family``; ``trainer`` names who refuses it (e.g.
    ``"train_sed trains"``)."""
    if not isinstance(segmenter, Segmenter):
        raise TypeError(f"expected a Segmenter, got {type(segmenter).__name__}")
    if segmenter.config.family != family:
        raise ValueError(f"{trainer} {family!r} models, not {segmenter.config.family!r}")
    model = segmenter.model
    if any(p.dtype != torch.float32 for p in model.parameters()):
        model.float()
    return model


def deop_model(segmenter: Segmenter) -> nn.Module:
    """The segmenter's DeOP model in float32."""
    return family_model(segmenter, "deop", "the training stages train")


def prepare_stage(
    segmenter: Segmenter, dataset: Any, crop_size: int | None, model_of, default_crop=None
) -> tuple[nn.Module, int, list[str], torch.Tensor]:
    """The checks every segmentation stage starts with: ``(model, crop size, seen class
    names, lookup)``. ``model_of(segmenter)`` gives the float32 model; the crop defaults
    to ``default_crop(model.config)``, else the model's inference short side."""
    check_dataset(dataset)
    model = model_of(segmenter)
    if crop_size:
        size = crop_size
    elif default_crop is not None:
        size = default_crop(model.config)
    else:
        size = model.config.preprocess.short_side
    check_crop(size, model.config)
    names, lookup = seen_classes(dataset)
    return model, size, names, lookup


def seen_record(names: list[str], dataset: Any, crop_size: int | None) -> dict[str, Any]:
    """The part of a stage's ``stage.json`` record every stage writes."""
    return {
        "classes": names,
        "unseen": [dataset.classes[i] for i in dataset.unseen_ids],
        "crop_size": crop_size,
    }


def clip_model_of(segmenter: Segmenter) -> nn.Module:
    """The segmenter's model, in float32, if its family can take open_clip weights."""
    if not isinstance(segmenter, Segmenter):
        raise TypeError(f"expected a Segmenter, got {type(segmenter).__name__}")
    if segmenter.config.family not in CLIP_FAMILIES:
        raise ValueError(
            f"--clip initialises {' or '.join(map(repr, CLIP_FAMILIES))} models, not "
            f"{segmenter.config.family!r}"
        )
    model = segmenter.model
    if any(p.dtype != torch.float32 for p in model.parameters()):
        model.float()
    return model


def check_dataset(dataset: Any) -> None:
    """A labelled dataset with class names and no transform of its own."""
    for attribute in ("classes", "unseen_ids", "load"):
        if not hasattr(dataset, attribute):
            raise TypeError(
                f"the dataset needs a {attribute!r} attribute (use FolderDataset or "
                f"CocoStuffDataset); got {type(dataset).__name__}"
            )
    if getattr(dataset, "transform", None) is not None:
        raise ValueError(
            "leave dataset.transform unset: the stage augments samples itself "
            "(pass augment=... to replace its augmentation)"
        )
    if len(dataset) == 0:
        raise ValueError("the dataset is empty")


def seen_classes(dataset: Any) -> tuple[list[str], torch.Tensor]:
    """The dataset's seen class names (in order) and a label lookup.

    ``lookup`` is int64 ``(num_classes + 1,)``: ``lookup[label]`` maps a dataset class id
    to its index among the seen classes, an unseen id to ``IGNORE_INDEX``, and
    ``IGNORE_INDEX`` (-1, which indexes the last entry) to itself.
    """
    unseen = set(dataset.unseen_ids)
    names = [name for i, name in enumerate(dataset.classes) if i not in unseen]
    if not names:
        raise ValueError("every class of the dataset is unseen: nothing to train on")
    lookup = torch.full((len(dataset.classes) + 1,), IGNORE_INDEX, dtype=torch.int64)
    seen_ids = [i for i in range(len(dataset.classes)) if i not in unseen]
    lookup[seen_ids] = torch.arange(len(seen_ids))
    return names, lookup


def check_crop(size: int, config) -> None:
    """Training crops go into the model as they are: their side must fit the padding grid."""
    multiple = config.preprocess.pad_multiple
    if size < multiple or size % multiple:
        raise ValueError(f"crop_size must be a positive multiple of {multiple}, got {size}")


def load_clip_weights(
    segmenter: Segmenter,
    spec: str,
    *,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
) -> Segmenter:
    """Initialise the CLIP parts from pretrained open_clip weights, in safetensors only.

    ``spec`` names the CLIP as inference does (:func:`onepass_ovs.hub.resolve_clip`):
    ``"ViT-B-16/openai"`` (open_clip's model config and pretrained tag; the tag's
    safetensors file on the Hugging Face Hub, in the same cache as
    ``Segmenter.from_clip``), ``"hf-hub:org/repo"`` or ``"local-dir:/path"`` (an
    ``open_clip_config.json`` + safetensors folder). Pickled checkpoints are never
    loaded. The towers are copied by the model's ``load_clip_weights`` (DeOP: ViT image
    tower and text tower, its own additions -- learned positions, prompt context -- keep
    their values; SED: a ConvNeXt CLIP's image trunk with its head, and the text tower).

    Raises ``ValueError`` for an unknown or malformed name, weights that cannot be had
    (offline and not cached, or published only as a pickle), or an architecture that
    does not fit the model.
    """
    from ...config import ClipConfig
    from ...hub import ModelNotAvailableError, resolve_clip
    from ...models.towers import create_clip, load_open_clip_weights, tower_kind

    model = clip_model_of(segmenter)
    spec = str(spec)
    if not spec.startswith(("hf-hub:", "local-dir:")) and "/" not in spec:
        raise ValueError(
            "--clip expects 'MODEL/TAG' (e.g. 'ViT-B-16/openai'), 'hf-hub:org/repo' or "
            f"'local-dir:/path'; got {spec!r}"
        )
    try:
        source = resolve_clip(spec, cache_dir=cache_dir, local_files_only=local_files_only)
    except (ModelNotAvailableError, ValueError) as err:
        raise ValueError(f"cannot load the open_clip weights {spec!r}: {err}") from err
    if source.folder is not None:
        raise ValueError(
            f"{spec!r} is a onepass model, not an open_clip checkpoint: start from it with "
            "--model instead of --clip"
        )
    clip_config = ClipConfig(model_name=spec, model_cfg=source.model_cfg)
    try:
        ours = tower_kind(model.config.clip)
    except ValueError:  # no dense image tower (GKC keeps only a ResNet trunk): the model checks
        ours = None
    theirs = tower_kind(clip_config) if ours is not None else None
    if theirs != ours:
        raise ValueError(
            f"the CLIP {spec!r} has a {theirs!r} image tower but the "
            f"{segmenter.config.family!r} model needs a {ours!r} one"
        )
    clip = create_clip(clip_config)
    load_open_clip_weights(clip, source.weights)
    # GELU vs QuickGELU (OpenAI's weights) must agree: load_clip_weights checks it
    device = next(model.parameters()).device
    try:
        model.load_clip_weights(clip.to(device))
    except RuntimeError as err:  # shape mismatches
        raise ValueError(f"the CLIP {spec!r} does not fit the model: {err}") from err
    return segmenter


def clip_input_size(config) -> int:
    """CLIP's native image side from the model config (224 for ViT-B/16)."""
    size = config.clip.model_cfg.get("vision_cfg", {}).get("image_size", 224)
    return int(size[0] if isinstance(size, list | tuple) else size)


# ----------------------------------------------------------------------------- stage model


class StageModel(nn.Module):
    """A DeOP model as one training stage sees it.

    The model's parts are registered here under their own names, so parameter names,
    lr-multiplier prefixes and checkpoint keys are the model's (``proposals.backbone.*``,
    ``anchors.*``); a stage adds its own modules next to them. Only parameters under a
    ``trainable`` prefix get gradients. A part with no trainable parameter stays in eval
    mode whatever ``train()`` is told: the engine calls ``model.train()``, and a frozen
    network's BatchNorm statistics and dropout must not change.

    ``forward(images (B, 3, S, S) in [0, 1], targets) -> {"loss": scalar, **terms}``.
    """

    def __init__(self, model: nn.Module, trainable: Sequence[str]):
        super().__init__()
        for name, child in model.named_children():
            self.add_module(name, child)
        for name, param in model.named_parameters(recurse=False):
            self.register_parameter(name, param)
        # The model itself is not a submodule (its parts are, above): calling it runs
        # the shared parts, and the state dict has no duplicated "model." copies.
        object.__setattr__(self, "model", model)
        self.trainable_prefixes = tuple(trainable)
        for name, param in model.named_parameters():
            param.requires_grad_(_under(name, self.trainable_prefixes))

    def frozen_parts(self) -> list[str]:
        """Names of the model's parts whose parameters are all frozen."""
        out = []
        for name, child in self.model.named_children():
            params = list(child.parameters())
            if params and not any(p.requires_grad for p in params):
                out.append(name)
        return out

    def train(self, mode: bool = True):
        super().train(mode)
        for name in self.frozen_parts():
            getattr(self, name).eval()
        return self


@torch.no_grad()
def frozen_text_embeddings(model: nn.Module, class_names: list[str]) -> torch.Tensor:
    """``model.text(class_names)`` in eval mode, float32, detached: (K, E), or SED's
    per-template (K, P, E). The text tower's train/eval mode is left as it was."""
    was_training = model.text.training
    model.text.eval()
    text = model.text(class_names).float().detach().clone()
    model.text.train(was_training)
    return text


def _under(name: str, prefixes: Iterable[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def stage_loss(model: nn.Module, batch: dict) -> dict:
    """The engine's ``loss_fn``: stage models compute their loss in ``forward``."""
    return model(batch["image"], batch["label"] if "label" in batch else batch["class_id"])


# ----------------------------------------------------------------------------- running


def train_and_save(
    stage: str,
    model: nn.Module,
    make_stage,
    dataset: Any,
    config: TrainConfig,
    *,
    sample_transform,
    resume: bool | str | os.PathLike,
    record: dict[str, Any],
    loss_fn=None,
) -> Segmenter:
    """Build the stage's :class:`StageModel` with ``make_stage()``, train it with the
    engine (``model``'s ``requires_grad`` flags are restored afterwards; the run and
    ``record`` go to ``output_dir/training``; ``loss_fn`` defaults to :func:`stage_loss`)
    and :func:`finish`: the trained Segmenter, saved to ``config.output_dir``."""
    run_config = dataclasses.replace(config, output_dir=str(Path(config.output_dir) / RUN_DIR))
    run_dir = Path(run_config.output_dir)
    with restore_requires_grad(model):
        trainer = Trainer(
            make_stage(),
            loss_fn if loss_fn is not None else stage_loss,
            dataset,
            run_config,
            collate_fn=collate,
            sample_transform=sample_transform,
        )
        refused = not resume and list_checkpoints(run_dir)  # fit() raises; keep that run's record
        if trainer.dist.is_main and not refused:
            run_dir.mkdir(parents=True, exist_ok=True)
            payload = {"stage": stage, **record}
            (run_dir / STAGE_FILE).write_text(json.dumps(payload, indent=2) + "\n")
        trainer.fit(resume=resume)
    return finish(model, trainer, config.output_dir)


def finish(model: nn.Module, trainer: Trainer, output_dir: str | os.PathLike) -> Segmenter:
    """Wrap the trained model; rank 0 writes ``config.json`` + ``model.safetensors``."""
    segmenter = Segmenter(model, device=trainer.device)
    if trainer.dist.is_main:
        segmenter.save_pretrained(output_dir)
    barrier()
    return segmenter


class restore_requires_grad:
    """Context manager: put every parameter's ``requires_grad`` back as it was."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __enter__(self):
        self.flags = {name: p.requires_grad for name, p in self.model.named_parameters()}
        return self

    def __exit__(self, *exc) -> None:
        for name, param in self.model.named_parameters():
            param.requires_grad_(self.flags.get(name, True))


def seeded_init(seed: int, what: str) -> None:
    """Seed torch before creating a stage's new parameters (same values on every rank)."""
    torch.manual_seed(derive_seed(seed, what))


def rebuild(model: nn.Module, config) -> nn.Module:
    """A model built from ``config`` holding every weight of ``model`` that still fits."""
    new = build_model(config)
    new_state = new.state_dict()
    old_state = model.state_dict()
    carried = {
        k: v for k, v in old_state.items() if k in new_state and v.shape == new_state[k].shape
    }
    new.load_state_dict(carried, strict=False)
    dropped = sorted(set(old_state) - set(carried))
    if dropped:
        logger.warning(
            "rebuilding the model dropped %d weights, e.g. %s", len(dropped), dropped[:3]
        )
    return new.to(next(model.parameters()).device)
