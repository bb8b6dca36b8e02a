"""GKC's training-only pieces as pure functions: text-guided knowledge distillation (the
loss and the teacher's region inputs) and synonym sampling (docs/methods.md section 4). No
trainer here. The teacher is a frozen CLIP in eval mode (the authors' code leaves it in
train mode, so its BatchNorms use batch statistics; we do not).

Text-guided distillation, per ground-truth region i of an image: s_i the student embedding
(the model's distillation head on the matched query), c_i the frozen CLIP teacher's
embedding of the region, t_i the text embedding of the region's drawn synonym, all
L2-normalised; a a learnable scalar (init 1). Within each image::

    P_ij = (a^2 t_i . t_j - s_i . c_j)^2     for all ordered pairs (i = j included)
    D_i  = ||s_i - c_i||^2

and the loss is ONE mean over the union of every image's P's and D's (not the sum of two
means): sum(P) + sum(D) over (sum_g n_g^2 + sum_g n_g).

Synonym sampling: each region's synonyms carry probabilities (scored once, offline, by a
frozen CLIP); every time an image is loaded each region draws one synonym uniformly among
those with probability > 0.1.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..config import CLIP_MEAN, CLIP_STD

SYNONYM_THRESHOLD = 0.1
TEACHER_GREY = 128 / 255


# -- text-guided distillation ---------------------------------------------------------------------


class DistillationScale(nn.Module):
    """The learnable scalar ``a`` of the distillation loss (init 1)."""

    def __init__(self, init: float = 1.0):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(float(init)))

    def forward(self) -> torch.Tensor:
        return self.a


def text_guided_distillation_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    text: torch.Tensor,
    image_index: torch.Tensor,
    scale: torch.Tensor,
) -> torch.Tensor:
    """GKC's text-guided KD loss (see the module docstring).

    Args:
        student: (R, E) s_i, L2-normalised, R regions of the whole batch.
        teacher: (R, E) c_i, L2-normalised (no gradient is expected to flow into it).
        text: (R, E) t_i, L2-normalised.
        image_index: (R,) which image each region belongs to; pairs are formed only within
            an image.
        scale: the scalar a (a 0-d tensor, learnable).

    Returns:
        a 0-d tensor; zero (still attached to ``student`` and ``scale``) when R = 0.
    """
    if student.shape != teacher.shape or student.shape != text.shape or student.dim() != 2:
        raise ValueError(
            f"student, teacher and text must all be (R, E); got {tuple(student.shape)}, "
            f"{tuple(teacher.shape)}, {tuple(text.shape)}"
        )
    image_index = torch.as_tensor(image_index, device=student.device)
    if image_index.shape != (student.shape[0],):
        raise ValueError(f"image_index must be ({student.shape[0]},), got {tuple(image_index.shape)}")
    if student.shape[0] == 0:
        return student.sum() * 0 + scale * 0
    dtype = torch.promote_types(student.dtype, torch.float32)  # at least fp32
    s, c, t = student.to(dtype), teacher.to(dtype), text.to(dtype)
    same = image_index[:, None] == image_index[None, :]  # (R, R)
    pairs = (scale.to(dtype) ** 2 * (t @ t.t()) - s @ c.t()) ** 2
    pair_sum = (pairs * same).sum()
    diag_sum = ((s - c) ** 2).sum(-1).sum()
    count = same.sum() + s.shape[0]
    return (pair_sum + diag_sum) / count


def distillation_over_outputs(
    outputs: Sequence[dict],
    indices: Sequence[tuple[torch.Tensor, torch.Tensor]],
    teacher: Sequence[torch.Tensor],
    text: Sequence[torch.Tensor],
    scale: torch.Tensor,
) -> torch.Tensor:
    """The distillation loss summed over decoder outputs, every output using the FINAL
    output's matching (as the authors: aux outputs reuse the final matching's regions,
    each with that layer's own matched query).

    Args:
        outputs: per decoder output a dict with ``distill_embeddings`` (B, N, E)
            (``GKC.forward``'s final output and its ``aux`` entries).
        indices: per image (query_idx (M,), target_idx (M,)) from the final matching.
        teacher: per image (T_b, E) teacher embeddings c of its targets, normalised.
        text: per image (T_b, E) text embeddings t of its targets' drawn synonyms.
        scale: the scalar a.

    Returns the sum over outputs of :func:`text_guided_distillation_loss` (the caller
    applies the weight, 10 in the paper).
    """
    if not (len(indices) == len(teacher) == len(text)):
        raise ValueError(
            f"{len(indices)} matchings, {len(teacher)} teacher and {len(text)} text tensors: "
            "one each per image"
        )
    image_index = torch.cat(
        [torch.full((len(q),), b, dtype=torch.long) for b, (q, _) in enumerate(indices)]
    )
    c = torch.cat([teacher[b][t] for b, (_, t) in enumerate(indices)])
    t_emb = torch.cat([text[b][t] for b, (_, t) in enumerate(indices)])
    total = None
    for out in outputs:
        emb = out["distill_embeddings"]
        s = torch.cat([emb[b, q] for b, (q, _) in enumerate(indices)])
        loss = text_guided_distillation_loss(s, c.to(s.device), t_emb.to(s.device),
                                             image_index.to(s.device), scale)
        total = loss if total is None else total + loss
    if total is None:
        raise ValueError("no decoder outputs given")
    return total


def teacher_region_inputs(
    image: torch.Tensor,
    masks: torch.Tensor,
    size: int = 224,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
    *,
    crop: bool = True,
) -> torch.Tensor:
    """The CLIP teacher's input for each ground-truth region, as GKC's authors build it:
    pixels outside the region's mask grey (128), the crop to the mask's bounding box,
    resized to ``size`` x ``size`` (aspect not kept; bilinear, antialiased when
    shrinking), normalised with ``mean``/``std``.

    ``crop=False`` keeps the whole image (still greyed outside the mask), so the region
    keeps its place and scale: for a CLIP that never saw magnified objects (the shapes
    world's tiny CLIP names 93% of regions this way and a third of the box crops).

    image (3, H, W) in [0, 1] (un-augmented); masks (R, H, W) bool -> (R, 3, size, size).
    An empty mask raises ``ValueError`` naming it.
    """
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"image must be (3, H, W), got {tuple(image.shape)}")
    if masks.dim() != 3 or masks.shape[-2:] != image.shape[-2:]:
        raise ValueError(f"masks must be (R, {image.shape[1]}, {image.shape[2]}), got {tuple(masks.shape)}")
    mean_t = image.new_tensor(mean).view(3, 1, 1)
    std_t = image.new_tensor(std).view(3, 1, 1)
    crops = []
    for index, mask in enumerate(masks.bool()):
        rows = mask.any(1).nonzero()
        cols = mask.any(0).nonzero()
        if rows.numel() == 0:
            raise ValueError(f"mask {index} is empty: a region needs at least one pixel")
        region = torch.where(mask, image, image.new_tensor(TEACHER_GREY))
        if crop:
            y0, y1 = int(rows[0]), int(rows[-1]) + 1
            x0, x1 = int(cols[0]), int(cols[-1]) + 1
            region = region[:, y0:y1, x0:x1]
        if region.shape[-2:] != (size, size):
            region = F.interpolate(region[None], size=(size, size), mode="bilinear",
                                   align_corners=False, antialias=True)[0]
        crops.append((region - mean_t) / std_t)
    if not crops:
        return image.new_zeros(0, 3, size, size)
    return torch.stack(crops)


# -- synonym sampling --------------------------------------------------------------------------


def eligible_synonyms(
    synonyms: Sequence[str], probabilities: Sequence[float], threshold: float = SYNONYM_THRESHOLD
) -> list[str]:
    """The synonyms whose probability exceeds ``threshold``; if none does, the most probable
    one alone (a region always has a name)."""
    if len(synonyms) != len(probabilities):
        raise ValueError(f"{len(synonyms)} synonyms but {len(probabilities)} probabilities")
    if not synonyms:
        raise ValueError("a region needs at least one synonym")
    probs = [float(p) for p in probabilities]
    chosen = [name for name, p in zip(synonyms, probs, strict=True) if p > threshold]
    if not chosen:
        chosen = [synonyms[max(range(len(probs)), key=probs.__getitem__)]]
    return chosen


def draw_synonyms(
    regions: Sequence[tuple[Sequence[str], Sequence[float]]],
    rng: random.Random,
    threshold: float = SYNONYM_THRESHOLD,
) -> list[str]:
    """One synonym per region, uniform among its eligible ones (:func:`eligible_synonyms`).

    ``regions``: per region (its class's synonyms, their probabilities for this region).
    Call it at every load of the image (with a persistent ``rng``): each call is a fresh
    draw.
    """
    return [rng.choice(eligible_synonyms(names, probs, threshold)) for names, probs in regions]


def image_vocabulary(
    class_names: Sequence[str], region_classes: Sequence[int], region_names: Sequence[str]
) -> tuple[list[str], list[int]]:
    """The per-image vocabulary and each region's target index in it, as GKC's authors:
    the training classes' names, each present class renamed to its first region's draw; a
    class's other (different) draws are appended after the training classes.

    Returns (vocabulary, targets) with ``vocabulary[targets[i]] == region_names[i]``.
    """
    if len(region_classes) != len(region_names):
        raise ValueError(f"{len(region_classes)} region classes but {len(region_names)} names")
    vocabulary = list(class_names)
    renamed: set[int] = set()
    appended: dict[str, int] = {}
    targets = []
    for cls, name in zip(region_classes, region_names, strict=True):
        cls = int(cls)
        if not 0 <= cls < len(class_names):
            raise ValueError(f"region class {cls} is outside the {len(class_names)} training classes")
        if cls not in renamed:
            vocabulary[cls] = name
            renamed.add(cls)
            targets.append(cls)
        elif vocabulary[cls] == name:
            targets.append(cls)
        else:
            if name not in appended:
                appended[name] = len(vocabulary)
                vocabulary.append(name)
            targets.append(appended[name])
    return vocabulary, targets
