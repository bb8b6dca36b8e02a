"""GKC's offline steps, run once before training: scoring each region's synonyms with a
frozen CLIP, and the distillation teacher's embedding of each region. Both are cached.

- :class:`FrozenClip`: a CLIP image tower + text tower, frozen and always in eval mode
  (GKC's authors leave their teacher in train mode, so its BatchNorms use batch
  statistics; here they never do). Built from an open_clip model
  (:meth:`FrozenClip.from_open_clip`, e.g. OpenAI's RN50, the paper's teacher), from a
  onepass model's CLIP (``"demo"``) or by :func:`load_frozen_clip` from a name.
- :func:`score_synonyms`: per region (a class's pixels in one dataset image), the
  softmax over that class's synonyms of the CLIP's ``"a photo of {}"`` logits on the
  region's box crop of the original image (no mask), as the authors (or the region in
  place, see ``FrozenClip``'s ``region_view``).
- :func:`teacher_embeddings`: per region, the teacher's L2-normalised image embedding of
  the un-augmented image, pixels outside the mask grey, cropped to the mask's box,
  resized to the CLIP's input size (:func:`~onepass_ovs.training.gkc_losses.
  teacher_region_inputs`). The teacher only ever sees un-augmented images, so on a
  static dataset these embeddings are exact to cache.

Caches: ``synonym_scores.json`` (JSON) and ``teacher_embeddings.safetensors``; each
records what it was computed from (CLIP name, template, synonym lists, images), and a
cache that does not match is recomputed (with a warning), never silently reused.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import CLIP_MEAN, CLIP_STD
from ..data import IGNORE_INDEX, semantic_to_instances
from .gkc_losses import teacher_region_inputs

__all__ = [
    "SCORE_TEMPLATE",
    "FrozenClip",
    "box_crop_inputs",
    "load_frozen_clip",
    "load_or_score_synonyms",
    "load_or_embed_regions",
    "score_synonyms",
    "teacher_embeddings",
]

logger = logging.getLogger("onepass_ovs.training")

SCORE_TEMPLATE = "a photo of {}"
SCORES_FORMAT = 1
REGION_VIEWS = ("box", "in_place")


class FrozenClip(nn.Module):
    """A frozen CLIP for offline scoring and distillation targets; always in eval mode.

    Args:
        image_encoder: ``f(pixels (R, 3, S, S) normalised with mean/std) -> (R, E)``.
        text_encoder: a :class:`~onepass_ovs.text.TextEncoder` (its ``encode_prompts``).
        input_size: S, the CLIP's native input side.
        mean, std: the CLIP's normalisation.
        logit_scale: the CLIP's softmax scale (its learned ``exp(s)``, 100 for OpenAI's).
        name: what the caches record (e.g. ``"RN50/openai"``).
        region_view: how a region is shown to this CLIP. ``"box"`` (the authors'): the
            crop to the region's bounding box, resized to S (greyed outside the mask for
            distillation, not for synonym scoring). ``"in_place"``: the whole image with
            the pixels outside the mask grey, so the region keeps its scale -- for a CLIP
            that never saw magnified objects (the shapes world's tiny CLIP).
    """

    def __init__(
        self,
        image_encoder: nn.Module,
        text_encoder: nn.Module,
        *,
        input_size: int,
        mean: Sequence[float] = CLIP_MEAN,
        std: Sequence[float] = CLIP_STD,
        logit_scale: float = 100.0,
        name: str = "clip",
        region_view: str = "box",
    ):
        super().__init__()
        if region_view not in REGION_VIEWS:
            raise ValueError(f"region_view must be one of {REGION_VIEWS}, got {region_view!r}")
        self.region_view = region_view
        self.image_encoder = image_encoder
        self.text_encoder = text_encoder
        self.input_size = int(input_size)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.logit_scale = float(logit_scale)
        self.name = str(name)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True):
        return super().train(False)  # a teacher never leaves eval mode

    @property
    def cache_name(self) -> str:
        """What the caches record: the name, and the region view when not the default."""
        return self.name if self.region_view == "box" else f"{self.name} [{self.region_view}]"

    def region_inputs(self, image: torch.Tensor, masks: torch.Tensor, greyed: bool) -> torch.Tensor:
        """This CLIP's normalised inputs (R, 3, S, S) for the regions ``masks`` (R, H, W)
        of ``image`` (3, H, W) in [0, 1]: ``greyed`` (distillation) greys the pixels
        outside each mask; ``"in_place"`` views always grey them (a whole image is no view
        of one region otherwise)."""
        if self.region_view == "in_place":
            return teacher_region_inputs(image, masks, self.input_size, self.mean, self.std,
                                         crop=False)  # fmt: skip
        if greyed:
            return teacher_region_inputs(image, masks, self.input_size, self.mean, self.std)
        return box_crop_inputs(image, masks, self.input_size, self.mean, self.std)

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        """(R, 3, S, S) normalised -> (R, E) L2-normalised float32 embeddings."""
        device = next(self.parameters()).device
        chunks = [
            self.image_encoder(pixels[i : i + batch_size].to(device)).float()
            for i in range(0, pixels.shape[0], batch_size)
        ]
        if not chunks:
            return torch.zeros(0, self.embed_dim)
        return F.normalize(torch.cat(chunks), dim=-1).cpu()

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        """Prompts -> (P, E) L2-normalised float32 embeddings."""
        return F.normalize(self.text_encoder.encode_prompts(list(prompts)).float(), dim=-1).cpu()

    @property
    def embed_dim(self) -> int:
        return self.text_encoder.embed_dim

    @classmethod
    def from_open_clip(
        cls,
        clip_model: nn.Module,
        model_cfg: dict,
        *,
        mean: Sequence[float] = CLIP_MEAN,
        std: Sequence[float] = CLIP_STD,
        name: str = "clip",
        region_view: str = "box",
    ) -> FrozenClip:
        """An open_clip ``CLIP`` (any image tower: ResNet, ViT); its ``visual`` gives the
        pooled embedding (the RN's attention pool, the ViT's projected class token)."""
        from ..models.towers import create_tokenizer
        from ..text import TextEncoder

        size = model_cfg.get("vision_cfg", {}).get("image_size", 224)
        size = size[0] if isinstance(size, list | tuple) else size
        scale = float(clip_model.logit_scale.detach().exp().reshape(-1)[0])
        text = TextEncoder(clip_model, create_tokenizer(model_cfg), templates="single")
        return cls(clip_model.visual, text, input_size=size, mean=mean, std=std,
                   logit_scale=scale, name=name, region_view=region_view)  # fmt: skip

    @classmethod
    def from_training_free(
        cls, model: nn.Module, *, name: str = "clip", region_view: str = "box"
    ) -> FrozenClip:
        """The CLIP of a :class:`~onepass_ovs.models.training_free.TrainingFreeCLIP` (e.g.
        ``Segmenter.from_clip("demo").model``): its tower's global embedding."""
        config = model.config
        size = config.clip.model_cfg.get("vision_cfg", {}).get("image_size", 224)
        size = size[0] if isinstance(size, list | tuple) else size
        return cls(_GlobalEmbedding(model.clip_visual), model.text, input_size=size,
                   mean=config.preprocess.clip_mean, std=config.preprocess.clip_std,
                   logit_scale=config.clip.logit_scale, name=name,
                   region_view=region_view)  # fmt: skip


class _GlobalEmbedding(nn.Module):
    def __init__(self, tower: nn.Module):
        super().__init__()
        self.tower = tower

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.tower.global_embedding(pixels)


def load_frozen_clip(
    spec: str,
    *,
    device: str | torch.device | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
    region_view: str = "box",
) -> FrozenClip:
    """A :class:`FrozenClip` named as ``--clip`` names CLIPs: ``"RN50/openai"`` (open_clip
    config + pretrained tag, safetensors from the Hub), ``"hf-hub:org/repo"``,
    ``"local-dir:/path"``, or ``"demo"`` / a saved onepass folder (the CLIP inside it).
    Pickled weights are never loaded."""
    from ..config import ClipConfig
    from ..hub import resolve_clip
    from ..models.towers import create_clip, load_open_clip_weights

    source = resolve_clip(str(spec), cache_dir=cache_dir, local_files_only=local_files_only)
    if source.folder is not None:
        from ..models.training_free import load_training_free

        model = load_training_free(source, severance="none", templates="single")
        clip = FrozenClip.from_training_free(model, name=str(spec), region_view=region_view)
    else:
        open_clip_model = create_clip(ClipConfig(model_name=str(spec), model_cfg=source.model_cfg))
        load_open_clip_weights(open_clip_model, source.weights)
        pre = source.preprocess
        clip = FrozenClip.from_open_clip(
            open_clip_model, source.model_cfg, mean=pre.get("mean", CLIP_MEAN),
            std=pre.get("std", CLIP_STD), name=str(spec), region_view=region_view,
        )  # fmt: skip
    return clip.to(device) if device is not None else clip


# -- region inputs ------------------------------------------------------------------------------


def box_crop_inputs(
    image: torch.Tensor,
    masks: torch.Tensor,
    size: int,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
) -> torch.Tensor:
    """Each region's bounding-box crop of the image (nothing greyed), resized to ``size``
    square (aspect not kept; bilinear, antialiased), normalised.

    image (3, H, W) in [0, 1]; masks (R, H, W) bool, none empty -> (R, 3, size, size).
    """
    mean_t = image.new_tensor(mean).view(3, 1, 1)
    std_t = image.new_tensor(std).view(3, 1, 1)
    crops = []
    for index, mask in enumerate(masks.bool()):
        rows, cols = mask.any(1).nonzero(), mask.any(0).nonzero()
        if rows.numel() == 0:
            raise ValueError(f"mask {index} is empty: a region needs at least one pixel")
        crop = image[:, int(rows[0]) : int(rows[-1]) + 1, int(cols[0]) : int(cols[-1]) + 1]
        if crop.shape[-2:] != (size, size):
            crop = F.interpolate(crop[None], size=(size, size), mode="bilinear",
                                 align_corners=False, antialias=True)[0]  # fmt: skip
        crops.append((crop - mean_t) / std_t)
    return torch.stack(crops) if crops else image.new_zeros(0, 3, size, size)


def _regions(dataset: Any, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(image float (3, H, W) in [0, 1], class ids (T,), masks (T, H, W)) of one image,
    unseen classes excluded (they are ignore pixels in the dataset's labels)."""
    image, label = dataset.load(index)
    label = label.clone()
    unseen = list(getattr(dataset, "unseen_ids", []))
    if unseen:
        label[torch.isin(label, torch.tensor(unseen))] = IGNORE_INDEX
    classes, masks = semantic_to_instances(label)
    return image.float() / 255.0, classes, masks


# -- synonym scoring ----------------------------------------------------------------------------


@torch.no_grad()
def score_synonyms(
    dataset: Any,
    synonyms: dict[int, list[str]],
    clip: FrozenClip,
    *,
    template: str = SCORE_TEMPLATE,
    progress: bool = False,
) -> dict[str, dict[int, list[float]]]:
    """``{stem: {class id: probabilities}}`` for every region of ``dataset`` whose class
    has synonyms (``synonyms``: dataset class id -> its synonym list): the softmax, over
    that class's synonyms, of ``clip.logit_scale * cos(box crop, template.format(syn))``.

    A class with one synonym gets ``[1.0]`` without running the CLIP.
    """
    text = {
        c: clip.encode_prompts([template.format(s) for s in names])
        for c, names in synonyms.items() if len(names) > 1
    }  # fmt: skip
    out: dict[str, dict[int, list[float]]] = {}
    indices = range(len(dataset))
    if progress:
        from tqdm.auto import tqdm

        indices = tqdm(indices, desc="scoring synonyms")
    for index in indices:
        image, classes, masks = _regions(dataset, index)
        keep = [i for i, c in enumerate(classes.tolist()) if c in synonyms]
        scores: dict[int, list[float]] = {}
        multi = [i for i in keep if int(classes[i]) in text]
        if multi:
            crops = clip.region_inputs(image, masks[multi], greyed=False)
            embeddings = clip.encode_images(crops)
            for row, i in enumerate(multi):
                c = int(classes[i])
                logits = clip.logit_scale * (text[c] @ embeddings[row])
                scores[c] = [float(p) for p in logits.double().softmax(0)]
        for i in keep:
            scores.setdefault(int(classes[i]), [1.0])
        out[dataset.stem(index)] = scores
    return out


def _stems(dataset: Any) -> list[str]:
    return [dataset.stem(i) for i in range(len(dataset))]


def load_or_score_synonyms(
    path: str | os.PathLike,
    dataset: Any,
    synonyms: dict[int, list[str]],
    clip: FrozenClip | None,
    *,
    template: str = SCORE_TEMPLATE,
    write: bool = True,
    progress: bool = False,
) -> dict[str, dict[int, list[float]]]:
    """The scores cached at ``path`` (JSON) when they were computed for these synonyms,
    this CLIP, template and images; otherwise :func:`score_synonyms`, written to ``path``
    when ``write``. ``clip`` None with no valid cache raises ``ValueError``."""
    path = Path(path)
    record = {
        "format": SCORES_FORMAT,
        "clip": clip.cache_name if clip is not None else None,
        "template": template,
        "synonyms": {str(c): list(v) for c, v in sorted(synonyms.items())},
        "images": _stems(dataset),
    }
    if path.is_file():
        try:
            cached = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            logger.warning("ignoring unreadable synonym scores %s: %s", path, err)
            cached = None
        if cached is not None:
            same = all(
                cached.get(k) == v for k, v in record.items() if not (k == "clip" and v is None)
            )
            if same:
                return {
                    stem: {int(c): list(p) for c, p in per.items()}
                    for stem, per in cached["scores"].items()
                }
            logger.warning("synonym scores %s were computed for other inputs; rescoring", path)
    if clip is None and any(len(v) > 1 for v in synonyms.values()):
        raise ValueError(
            f"no valid synonym scores at {path} and no CLIP to score with: give a scorer "
            "(e.g. scorer='ViT-B-32/openai' or a FrozenClip)"
        )
    scores = score_synonyms(dataset, synonyms, clip, template=template, progress=progress)
    if write:
        from .checkpoints import write_json_atomic

        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {**record, "scores": {s: {str(c): p for c, p in per.items()}
                                        for s, per in scores.items()}}  # fmt: skip
        write_json_atomic(path, payload)
    return scores


# -- teacher embeddings -------------------------------------------------------------------------


@torch.no_grad()
def teacher_embeddings(
    dataset: Any, clip: FrozenClip, *, progress: bool = False
) -> tuple[torch.Tensor, list[tuple[str, int]]]:
    """The teacher's embedding c of every region of ``dataset``: (R, E) float32
    L2-normalised, and the region keys ``(stem, class id)`` in row order."""
    rows: list[torch.Tensor] = []
    keys: list[tuple[str, int]] = []
    indices = range(len(dataset))
    if progress:
        from tqdm.auto import tqdm

        indices = tqdm(indices, desc="teacher embeddings")
    for index in indices:
        image, classes, masks = _regions(dataset, index)
        if classes.numel() == 0:
            continue
        inputs = clip.region_inputs(image, masks, greyed=True)
        rows.append(clip.encode_images(inputs))
        keys += [(dataset.stem(index), int(c)) for c in classes.tolist()]
    if not rows:
        return torch.zeros(0, clip.embed_dim), keys
    return torch.cat(rows).contiguous(), keys


def load_or_embed_regions(
    path: str | os.PathLike,
    dataset: Any,
    clip: FrozenClip | None,
    *,
    write: bool = True,
    progress: bool = False,
) -> tuple[torch.Tensor, list[tuple[str, int]]]:
    """The teacher embeddings cached at ``path`` (safetensors) when they were computed by
    this teacher for these images; otherwise :func:`teacher_embeddings`, written to
    ``path`` when ``write``."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = Path(path)
    images = _stems(dataset)
    if path.is_file():
        try:
            with safe_open(str(path), framework="pt") as handle:
                meta = handle.metadata() or {}
                embeddings = handle.get_tensor("embeddings")
            keys = [(str(s), int(c)) for s, c in json.loads(meta.get("keys", "[]"))]
            same = json.loads(meta.get("images", "null")) == images and (
                clip is None or meta.get("teacher") == clip.cache_name
            )
            if same and embeddings.shape[0] == len(keys):
                return embeddings, keys
            logger.warning(
                "teacher embeddings %s were computed for other inputs; recomputing", path
            )
        except (OSError, ValueError, KeyError) as err:
            logger.warning("ignoring unreadable teacher embeddings %s: %s", path, err)
    if clip is None:
        raise ValueError(
            f"no valid teacher embeddings at {path} and no teacher to compute them: give a "
            "teacher (e.g. teacher='RN50/openai' or a FrozenClip)"
        )
    embeddings, keys = teacher_embeddings(dataset, clip, progress=progress)
    if write:
        path.parent.mkdir(parents=True, exist_ok=True)
        temp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        save_file({"embeddings": embeddings}, str(temp), metadata={
            "teacher": clip.cache_name, "keys": json.dumps(keys), "images": json.dumps(images),
        })  # fmt: skip
        os.replace(temp, path)
    return embeddings, keys
