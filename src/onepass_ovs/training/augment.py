"""Training augmentation for (image, label) pairs, deterministic under a generator.

Every random draw goes through the ``generator`` argument (a CPU ``torch.Generator``;
``None`` uses torch's global one), so a transform called twice with generators seeded
alike returns identical tensors. :func:`~onepass_ovs.data.sample_generator` derives
that seed from ``(base seed, epoch, index)``, which makes a sample independent of
worker count and order, and makes a resumed run draw exactly the crops the interrupted
one would have.

Two ways to call an augmenter: ``aug(sample, generator)`` on a sample dict (the
protocol of :class:`~onepass_ovs.data.FolderDataset` and of the trainer's
``sample_transform``), or ``aug.apply(image, label, generator)`` on tensors.

Images are uint8 RGB ``(3, H, W)``; labels int64 ``(H, W)`` with ``ignore_index`` for
unlabelled pixels. Images are resized bilinearly (antialiased when shrinking), labels
by nearest neighbour sampled at the same pixel centres, so the two stay aligned.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from onepass_ovs.data import IGNORE_INDEX

__all__ = [
    "resize_image",
    "resize_label",
    "ColorJitter",
    "SegmentationAugment",
    "proposal_train_augment",
    "deop_train_augment",
    "region_crop",
    "RegionCrop",
    "CLIP_MEAN_RGB",
]

# CLIP's normalisation mean in 0..255: a background of this colour is zero after
# normalisation, i.e. "nothing" to the image encoder.
CLIP_MEAN_RGB = (123, 117, 104)


def _rand(n: int, generator: torch.Generator | None) -> list[float]:
    return torch.rand(n, generator=generator, dtype=torch.float64).tolist()


def _randint(low: int, high: int, generator: torch.Generator | None) -> int:
    """Uniform integer in ``[low, high]`` (inclusive)."""
    return int(torch.randint(low, high + 1, (1,), generator=generator))


def resize_image(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of a uint8 image ``(3, H, W)`` to ``size = (h, w)``."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    out = F.interpolate(
        image.unsqueeze(0).float(), size=size, mode="bilinear", align_corners=False, antialias=True
    )[0]
    return out.round_().clamp_(0, 255).to(torch.uint8)


def resize_label(label: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Nearest-neighbour resize of a label map ``(H, W)`` to ``size = (h, w)``.

    Output pixel centre ``(i + 0.5) * H / h`` reads the input pixel containing it: the
    same centre convention as bilinear ``align_corners=False``, exact for any integer
    dtype (``F.interpolate`` would need a float round trip).
    """
    height, width = label.shape[-2:]
    out_h, out_w = size
    if (height, width) == (out_h, out_w):
        return label
    rows = ((torch.arange(out_h, dtype=torch.float64) + 0.5) * (height / out_h)).long()
    cols = ((torch.arange(out_w, dtype=torch.float64) + 0.5) * (width / out_w)).long()
    rows = rows.clamp_(max=height - 1).to(label.device)
    cols = cols.clamp_(max=width - 1).to(label.device)
    return label[..., rows, :][..., cols]


def _grey(x: torch.Tensor) -> torch.Tensor:
    """ITU-R 601 luma of float RGB ``(3, H, W)`` -> ``(H, W)``."""
    return 0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2]


_RGB_TO_YIQ = torch.tensor(
    [[0.299, 0.587, 0.114], [0.5959, -0.2746, -0.3213], [0.2115, -0.5227, 0.3112]],
    dtype=torch.float64,
)


class ColorJitter:
    """Photometric jitter of a uint8 RGB image ``(3, H, W)``, SSD style.

    Each of brightness (additive, ``+-brightness`` of the full range), contrast (blend
    with the mean grey, factor in ``contrast``), saturation (blend with per-pixel grey,
    factor in ``saturation``) and hue (rotation of the chroma plane in YIQ by up to
    ``+-hue`` of a turn; 0 = off) is applied with probability ``prob``, in that order,
    clamping to [0, 255] after each step. The number of random draws is fixed, so the
    generator's state afterwards does not depend on which steps fired.
    """

    def __init__(
        self,
        brightness: float = 32 / 255,
        contrast: tuple[float, float] = (0.5, 1.5),
        saturation: tuple[float, float] = (0.5, 1.5),
        hue: float = 0.0,
        prob: float = 0.5,
    ) -> None:
        if not 0 <= hue <= 0.5:
            raise ValueError(f"hue is a fraction of a turn in [0, 0.5], got {hue}")
        self.brightness = brightness
        self.contrast = contrast
        self.saturation = saturation
        self.hue = hue
        self.prob = prob

    def __call__(
        self, image: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        u = _rand(8, generator)
        x = image.float()
        if u[0] < self.prob and self.brightness > 0:
            x = (x + (2 * u[1] - 1) * self.brightness * 255).clamp_(0, 255)
        if u[2] < self.prob:
            factor = self.contrast[0] + (self.contrast[1] - self.contrast[0]) * u[3]
            mean = _grey(x).mean()
            x = ((x - mean) * factor + mean).clamp_(0, 255)
        if u[4] < self.prob:
            factor = self.saturation[0] + (self.saturation[1] - self.saturation[0]) * u[5]
            grey = _grey(x).unsqueeze(0)
            x = ((x - grey) * factor + grey).clamp_(0, 255)
        if u[6] < self.prob and self.hue > 0:
            angle = (2 * u[7] - 1) * self.hue * 2 * math.pi
            rotate = torch.tensor(
                [
                    [1.0, 0.0, 0.0],
                    [0.0, math.cos(angle), -math.sin(angle)],
                    [0.0, math.sin(angle), math.cos(angle)],
                ],
                dtype=torch.float64,
            )
            matrix = torch.linalg.inv(_RGB_TO_YIQ) @ rotate @ _RGB_TO_YIQ
            x = torch.einsum("ij,jhw->ihw", matrix.to(x), x).clamp_(0, 255)
        return x.round_().to(torch.uint8)


class SegmentationAugment:
    """Resize (random short side), random crop, flip, colour jitter; output exactly S x S.

    ``apply(image uint8 (3, H, W), label int64 (H, W), generator=None)`` returns
    ``(image uint8 (3, S, S), label int64 (S, S))``; ``aug(sample, generator=None)``
    does the same to ``sample["image"]`` and ``sample["label"]`` (other keys kept):

    1. resize so the short side is a uniform integer in ``short_side`` (long side
       capped at ``max_long_side``);
    2. random ``S x S`` window (the whole side where the image is smaller); with
       ``max_category_ratio`` < 1, up to 10 windows are drawn until no single class
       covers that fraction of the labelled pixels (the last one is kept otherwise);
    3. colour jitter, then horizontal flip with ``hflip_prob``;
    4. pad bottom/right to ``S x S``: image with ``pad_value``, label with
       ``ignore_index`` (the DeOP stage-3 rule; jitter runs before padding so the pad
       stays exactly ``pad_value``).
    """

    def __init__(
        self,
        crop_size: int,
        short_side: tuple[int, int],
        *,
        max_long_side: int | None = None,
        pad_value: int = 128,
        ignore_index: int = IGNORE_INDEX,
        hflip_prob: float = 0.5,
        color_jitter: ColorJitter | None = None,
        max_category_ratio: float | None = None,
    ) -> None:
        if short_side[0] > short_side[1] or short_side[0] < 1:
            raise ValueError(f"short_side must be (low, high) with 1 <= low <= high: {short_side}")
        self.crop_size = int(crop_size)
        self.short_side = (int(short_side[0]), int(short_side[1]))
        self.max_long_side = max_long_side
        self.pad_value = pad_value
        self.ignore_index = ignore_index
        self.hflip_prob = hflip_prob
        self.color_jitter = color_jitter
        self.max_category_ratio = max_category_ratio

    def _resized_size(self, height: int, width: int, short: int) -> tuple[int, int]:
        scale = short / min(height, width)
        if self.max_long_side is not None and max(height, width) * scale > self.max_long_side:
            scale = self.max_long_side / max(height, width)
        return max(1, round(height * scale)), max(1, round(width * scale))

    def _crop_window(
        self, label: torch.Tensor, generator: torch.Generator | None
    ) -> tuple[int, int, int, int]:
        height, width = label.shape
        crop_h, crop_w = min(self.crop_size, height), min(self.crop_size, width)
        tries = 10 if self.max_category_ratio is not None and self.max_category_ratio < 1 else 1
        for _ in range(tries):
            top = _randint(0, height - crop_h, generator)
            left = _randint(0, width - crop_w, generator)
            if tries == 1:
                break
            window = label[top : top + crop_h, left : left + crop_w]
            _, counts = torch.unique(window[window != self.ignore_index], return_counts=True)
            if counts.numel() > 1 and counts.max() < self.max_category_ratio * counts.sum():
                break
        return top, left, crop_h, crop_w

    def __call__(self, sample: dict, generator: torch.Generator | None = None) -> dict:
        image, label = self.apply(sample["image"], sample["label"], generator)
        return {**sample, "image": image, "label": label}

    def apply(
        self,
        image: torch.Tensor,
        label: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if tuple(image.shape[1:]) != tuple(label.shape):
            raise ValueError(
                f"image {tuple(image.shape)} and label {tuple(label.shape)} differ in size"
            )
        short = _randint(self.short_side[0], self.short_side[1], generator)
        size = self._resized_size(label.shape[0], label.shape[1], short)
        image, label = resize_image(image, size), resize_label(label, size)

        top, left, crop_h, crop_w = self._crop_window(label, generator)
        image = image[:, top : top + crop_h, left : left + crop_w]
        label = label[top : top + crop_h, left : left + crop_w]

        flip = _rand(1, generator)[0] < self.hflip_prob
        if self.color_jitter is not None:
            image = self.color_jitter(image, generator)
        if flip:
            image, label = image.flip(-1), label.flip(-1)

        pad_h, pad_w = self.crop_size - crop_h, self.crop_size - crop_w
        if pad_h or pad_w:
            image = F.pad(image, (0, pad_w, 0, pad_h), value=self.pad_value)
            label = F.pad(label, (0, pad_w, 0, pad_h), value=self.ignore_index)
        return image.contiguous(), label.contiguous()


def proposal_train_augment(crop_size: int = 640) -> SegmentationAugment:
    """DeOP stage 2 (proposal MaskFormer): short side 320..960 (long side <= 2560),
    640 crops, colour jitter, flip."""
    return SegmentationAugment(
        crop_size,
        short_side=(crop_size // 2, crop_size * 3 // 2),
        max_long_side=2560,
        color_jitter=ColorJitter(),
    )


def deop_train_augment(crop_size: int = 512) -> SegmentationAugment:
    """DeOP stage 3 (heads): crops exactly 512 x 512, image padded with 128 and label
    with ignore. The short-side range 0.5x..2x the crop is this library's choice (the
    paper gives only the crop rule)."""
    return SegmentationAugment(
        crop_size,
        short_side=(crop_size // 2, crop_size * 2),
        max_long_side=4 * crop_size,
        color_jitter=ColorJitter(),
    )


def region_crop(
    image: torch.Tensor,
    label: torch.Tensor,
    class_id: int,
    *,
    size: int = 224,
    fill: Sequence[int] = CLIP_MEAN_RGB,
    scale: tuple[float, float] = (0.5, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    hflip_prob: float = 0.5,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Crop of one ground-truth region for prompt learning -> uint8 ``(3, size, size)``.

    Pixels outside ``label == class_id`` are painted ``fill`` (default: CLIP's mean
    colour); the image is
    cut to the region's bounding box; then a random resized crop (area fraction in
    ``scale``, aspect ratio in ``ratio``, 10 tries then a centre crop, as
    torchvision's RandomResizedCrop) is resized to ``size x size`` and flipped with
    ``hflip_prob``.
    """
    mask = label == class_id
    if not bool(mask.any()):
        raise ValueError(f"class {class_id} is not present in the label map")
    rows = torch.nonzero(mask.any(dim=1)).flatten()
    cols = torch.nonzero(mask.any(dim=0)).flatten()
    y0, y1, x0, x1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    fill_colour = torch.tensor(list(fill), dtype=image.dtype, device=image.device).view(3, 1, 1)
    region = torch.where(mask[y0:y1, x0:x1], image[:, y0:y1, x0:x1], fill_colour)

    height, width = region.shape[1:]
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        u = _rand(2, generator)
        target_area = area * (scale[0] + (scale[1] - scale[0]) * u[0])
        aspect = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * u[1])
        crop_w = round(math.sqrt(target_area * aspect))
        crop_h = round(math.sqrt(target_area / aspect))
        if 0 < crop_w <= width and 0 < crop_h <= height:
            top = _randint(0, height - crop_h, generator)
            left = _randint(0, width - crop_w, generator)
            break
    else:
        aspect = width / height
        if aspect < ratio[0]:
            crop_w, crop_h = width, max(1, round(width / ratio[0]))
        elif aspect > ratio[1]:
            crop_h, crop_w = height, max(1, round(height * ratio[1]))
        else:
            crop_h, crop_w = height, width
        top, left = (height - crop_h) // 2, (width - crop_w) // 2
    crop = resize_image(region[:, top : top + crop_h, left : left + crop_w], (size, size))
    if _rand(1, generator)[0] < hflip_prob:
        crop = crop.flip(-1)
    return crop.contiguous()


class RegionCrop:
    """Sample transform for prompt learning (DeOP stage 1): one region per sample.

    ``crop(sample, generator)`` takes ``{"image", "label", ...}`` and returns
    ``{"image": uint8 (3, size, size), "class_id": int, ...}`` (the label is dropped).
    The region is ``sample["class_id"]`` when present (e.g. from
    :class:`~onepass_ovs.data.RegionDataset`), otherwise a class drawn
    uniformly among those with at least ``min_pixels`` labelled pixels; a sample with
    none raises ``ValueError``. See :func:`region_crop` for the crop itself.
    """

    def __init__(
        self,
        size: int = 224,
        *,
        fill: Sequence[int] = CLIP_MEAN_RGB,
        scale: tuple[float, float] = (0.5, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        hflip_prob: float = 0.5,
        min_pixels: int = 1,
        ignore_index: int = IGNORE_INDEX,
    ) -> None:
        self.size = size
        self.fill = tuple(int(v) for v in fill)
        self.scale = scale
        self.ratio = ratio
        self.hflip_prob = hflip_prob
        self.min_pixels = min_pixels
        self.ignore_index = ignore_index

    def pick_class(self, label: torch.Tensor, generator: torch.Generator | None = None) -> int:
        """A class drawn uniformly among those with ``>= min_pixels`` pixels."""
        ids, counts = torch.unique(label[label != self.ignore_index], return_counts=True)
        ids = ids[counts >= self.min_pixels]
        if ids.numel() == 0:
            raise ValueError(f"no labelled region of >= {self.min_pixels} pixels")
        return int(ids[_randint(0, ids.numel() - 1, generator)])

    def apply(
        self,
        image: torch.Tensor,
        label: torch.Tensor,
        class_id: int,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        return region_crop(
            image,
            label,
            class_id,
            size=self.size,
            fill=self.fill,
            scale=self.scale,
            ratio=self.ratio,
            hflip_prob=self.hflip_prob,
            generator=generator,
        )

    def __call__(self, sample: dict, generator: torch.Generator | None = None) -> dict:
        class_id = sample.get("class_id")
        if class_id is None:
            class_id = self.pick_class(sample["label"], generator)
        crop = self.apply(sample["image"], sample["label"], int(class_id), generator)
        out = {k: v for k, v in sample.items() if k != "label"}
        return {**out, "image": crop, "class_id": int(class_id)}
