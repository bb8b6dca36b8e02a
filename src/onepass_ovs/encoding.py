"""Encode once, classify any vocabulary: the vocabulary-independent half of segmentation.

Every family splits its forward pass into ``encode_image`` (the expensive image pass, which
does not depend on the class names) and ``decode_scores`` (cheap, per vocabulary). An
:class:`ImageEncoding` keeps the first half for one image or a list of images, exactly as
:meth:`Segmenter.segment <onepass_ovs.segmenter.Segmenter.segment>` would have computed
it (same resize, padding, batches and sliding windows), so that::

    emb = seg.encode(image)                      # the image pass, once
    seg.segment(emb, ["cat", "dog", "sofa"])     # text + decode only
    seg.segment(emb, ["animal", "furniture"])    # text + decode only

gives the same results as ``seg.segment(image, vocabulary)`` for every vocabulary.

What is held, per family (tensors stay on the device they were computed on; ``to()``
moves them):

- ``deop``: mask logits (N, H/4, W/4) and the N anchor-pooled CLIP embeddings;
- ``clip`` (training-free): the dense normalised CLIP features (E, H/p, W/p);
- ``sed``: the dense CLIP embeddings (E, H/32, W/32) and the three guidance maps;
- ``gkc``: mask logits (N, H/4, W/4) and the N mask embeddings.

Images segmented in sliding windows keep one encoding per window pass. Training-only
outputs (DeOP's ``proposal_outputs``) are dropped.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .images import Geometry
from .sliding import Windows

# encode_image outputs only used in training: not kept
_TRAINING_ONLY_KEYS = ("proposal_outputs",)


def map_tensors(value, fn):
    """``value`` with ``fn`` applied to every tensor in it (dicts and lists walked)."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, dict):
        return {k: map_tensors(v, fn) for k, v in value.items()}
    if isinstance(value, list):
        return [map_tensors(v, fn) for v in value]
    return value


def _nbytes(value) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(_nbytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_nbytes(v) for v in value)
    return 0


def keep_for_decoding(encoding: dict) -> dict:
    """A model's ``encode_image`` output without its training-only entries."""
    return {k: v for k, v in encoding.items() if k not in _TRAINING_ONLY_KEYS}


@dataclass
class EncodedPass:
    """One forward pass's encoding: ``encode_image`` of a (b, 3, h, w) batch.

    ``encoding``: the model's dict (batch dimension first); ``boxes``: the sliding windows
    (y0, x0, y1, x1) on the image's padded canvas of the b batch rows (None: whole images).
    """

    encoding: dict
    boxes: list[tuple[int, int, int, int]] | None = None


@dataclass
class EncodedImage:
    """One image: its geometry and where its encoding lives.

    Whole-image passes: ``passes`` holds one shared :class:`EncodedPass` (several images may
    share it) and ``row`` is this image's index in that batch. Sliding windows: ``windows``
    is the layout and ``passes`` the window passes in order (``row`` unused).
    """

    geometry: Geometry
    passes: list[EncodedPass]
    row: int = 0
    windows: Windows | None = None


@dataclass
class ImageEncoding:
    """The vocabulary-independent image pass of one image or a list of images.

    Made by :meth:`Segmenter.encode <onepass_ovs.segmenter.Segmenter.encode>`; pass it to
    ``Segmenter.segment`` or ``Segmenter.classify`` in place of the images, with any
    vocabulary. ``many`` says whether a list was encoded (results come back as a list).
    """

    images: list[EncodedImage]
    many: bool
    family: str
    model_name: str
    model_id: int = field(repr=False, default=0)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> ImageEncoding:
        """The encoding of image ``index`` alone (its results come back unlisted)."""
        return ImageEncoding(
            [self.images[index]], False, self.family, self.model_name, self.model_id,
            self.device,
        )

    @property
    def sizes(self) -> list[tuple[int, int]]:
        """The (H, W) of each encoded input image."""
        return [image.geometry.original for image in self.images]

    def passes(self) -> list[EncodedPass]:
        """Every distinct forward pass held, in order."""
        seen: dict[int, EncodedPass] = {}
        for image in self.images:
            for p in image.passes:
                seen.setdefault(id(p), p)
        return list(seen.values())

    @property
    def nbytes(self) -> int:
        """Bytes of tensor data held."""
        return sum(_nbytes(p.encoding) for p in self.passes())

    def to(self, device) -> ImageEncoding:
        """A copy with every tensor on ``device`` (passes shared by images stay shared)."""
        device = torch.device(device)
        moved = {
            id(p): EncodedPass(map_tensors(p.encoding, lambda t: t.to(device)), p.boxes)
            for p in self.passes()
        }
        images = [
            EncodedImage(i.geometry, [moved[id(p)] for p in i.passes], i.row, i.windows)
            for i in self.images
        ]
        return ImageEncoding(images, self.many, self.family, self.model_name, self.model_id, device)

    def __repr__(self) -> str:
        sizes = ", ".join(f"{w}x{h}" for h, w in self.sizes[:4])
        more = f", ... ({len(self)} images)" if len(self) > 4 else ""
        return (
            f"ImageEncoding({self.family}/{self.model_name}: {sizes}{more}; "
            f"{self.nbytes / 2**20:.1f} MiB on {self.device})"
        )


def presence_scores(scores, geometry: Geometry, eps: float = 1e-8) -> torch.Tensor:
    """(K,) per-class presence: the highest probability each class reaches over the image.

    ``scores``: (K, h, w) non-negative class scores on the padded canvas (a tensor), or lazy
    scores of one image with ``rows(index) -> (1, K, n, W)`` at canvas resolution. Scores
    are normalised over classes per cell (as :attr:`SegmentationResult.probs` is) and the
    maximum is taken over the cells covering the valid (unpadded) region, at the model's
    output resolution (no upsampling to the input size).
    """
    hp, wp = geometry.padded
    h1, w1 = geometry.resized
    if isinstance(scores, torch.Tensor):
        k, h, w = scores.shape
        rows, cols = -(-h1 * h // hp), -(-w1 * w // wp)  # cells touching the valid region
        valid = scores[:, :rows, :cols].float().clamp_min(0)
        probs = (valid + eps) / (valid.sum(0, keepdim=True) + k * eps)
        return probs.flatten(1).amax(1)
    k = scores.shape[1]
    best = None
    step = max(1, (8 * 2**20) // max(1, 4 * k * wp))
    for top in range(0, h1, step):
        band = scores.rows(torch.arange(top, min(top + step, h1)))[0][..., :w1].float()
        probs = (band + eps) / (band.sum(0, keepdim=True) + k * eps)
        peak = probs.flatten(1).amax(1)
        best = peak if best is None else torch.maximum(best, peak)
    return best


__all__ = ["ImageEncoding", "EncodedImage", "EncodedPass", "presence_scores"]
