"""Painting external region masks with class scores (``segment(..., masks=...)``).

Families that classify masks (:class:`~onepass_ovs.models.interface.MaskClassifier`, e.g.
the training-free ``clip`` family) compute dense features once, classify each mask by its
average feature, and paint the masks' class distributions (DeOP's training-free demo).
Masks come at the image's size and are moved onto the padded working canvas here.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .images import Geometry
from .sliding import Windows, slide

# Bounds the masks painted at once (M masks + K class maps on the canvas); beyond it the
# masks are painted at a coarser stride.
_MASK_PAINT_BYTES = 256 * 2**20
# Bounds the full-size user masks resized at once.
_MASK_CHUNK_BYTES = 128 * 2**20


def paint_mask_scores(
    model,
    canvas: torch.Tensor,
    geometry: Geometry,
    masks: torch.Tensor,
    text: torch.Tensor,
    windows: Windows | None,
    batch_size: int,
    device: torch.device,
    dtype: torch.dtype,
) -> torch.Tensor:
    """One image with external masks (M, H0, W0) -> painted scores (K, Hp / s, Wp / s)."""
    hp, wp = geometry.padded
    multiple = model.config.preprocess.pad_multiple
    stride = paint_stride(hp, wp, masks.shape[0] + text.shape[0], multiple)
    canvas_masks = masks_on_canvas(masks, geometry, stride)  # (M, Hp / s, Wp / s)

    def features(batch, sizes, boxes):
        batch = batch.to(device=device, dtype=dtype)
        crops = None
        if model.needs_masks:
            crops = torch.stack(
                [canvas_masks[:, y0 // stride : y1 // stride, x0 // stride : x1 // stride]
                 for y0, x0, y1, x1 in boxes]
            ).to(device)
        return model.dense_features(batch, sizes, crops).float().cpu()

    if windows is not None and windows.needed(geometry.padded):
        # blending averages unit vectors; re-normalise so cosines stay cosines
        dense = F.normalize(
            slide(features, canvas, geometry, windows, batch_size, multiple), dim=0
        )
    else:
        dense = features(canvas[None], [geometry.resized], [(0, 0, hp, wp)])[0]
    scores = model.mask_scores(dense.to(device), canvas_masks.to(device), text)
    return scores.float().cpu()


def as_masks(masks, image_size: tuple[int, int], index: int) -> torch.Tensor:
    """One image's masks -> (M, H, W) tensor (bool, 0/1 integers or float in [0, 1])."""
    if isinstance(masks, np.ndarray):
        masks = torch.from_numpy(np.ascontiguousarray(masks))
    if not isinstance(masks, torch.Tensor):
        raise TypeError(
            f"masks of image {index} must be a numpy array or tensor, got {type(masks).__name__}"
        )
    masks = masks.detach().cpu()
    if masks.ndim == 2:
        masks = masks[None]
    if masks.ndim != 3 or tuple(masks.shape[-2:]) != tuple(image_size):
        raise ValueError(
            f"masks of image {index} must be (M, {image_size[0]}, {image_size[1]}) at the "
            f"image's size, got {tuple(masks.shape)}"
        )
    if masks.dtype == torch.bool:
        return masks
    if masks.is_floating_point():
        if masks.numel() and (masks.min() < 0 or masks.max() > 1):
            raise ValueError(f"float masks of image {index} must lie in [0, 1]")
        return masks
    if masks.numel() and (masks.min() < 0 or masks.max() > 1):
        raise ValueError(f"integer masks of image {index} must be 0/1; pass bool or float masks")
    return masks


def paint_stride(height: int, width: int, planes: int, multiple: int) -> int:
    """Coarsest-needed stride (a power of two dividing ``multiple``) to paint ``planes``
    maps of the (height, width) canvas within the memory bound."""
    stride = 1
    while planes * (height // stride) * (width // stride) * 4 > _MASK_PAINT_BYTES and (
        multiple % (2 * stride) == 0
    ):
        stride *= 2
    return stride


def masks_on_canvas(masks: torch.Tensor, geometry: Geometry, stride: int) -> torch.Tensor:
    """(M, H0, W0) masks at the image's size -> (M, Hp / stride, Wp / stride) float coverage
    on the padded working canvas (zero in the padding)."""
    (h0, w0), (h1, w1), (hp, wp) = geometry.original, geometry.resized, geometry.padded
    out = torch.zeros(masks.shape[0], hp // stride, wp // stride)
    chunk = max(1, _MASK_CHUNK_BYTES // (4 * (h0 * w0 + hp * wp)))
    for start in range(0, masks.shape[0], chunk):
        part = masks[start : start + chunk].float()[None]
        if (h1, w1) != (h0, w0):
            # antialiased: a downscaled mask keeps its area coverage instead of aliasing
            part = F.interpolate(
                part, size=(h1, w1), mode="bilinear", align_corners=False, antialias=True
            ).clamp_(0, 1)
        part = F.pad(part, (0, wp - w1, 0, hp - h1))
        if stride > 1:
            part = F.avg_pool2d(part, stride)
        out[start : start + chunk] = part[0]
    return out
