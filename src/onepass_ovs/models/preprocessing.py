"""Model-side preprocessing shared by every family: normalisation and the valid region.

Images reach a model as (B, 3, H, W) in [0, 1], zero-padded to a common size; each family
normalises them for its towers with the mean/std its config carries.
"""

from __future__ import annotations

import torch


def normalise(images: torch.Tensor, mean, std, valid: torch.Tensor | None) -> torch.Tensor:
    """(x - mean) / std, then zero outside the valid region (zero padding in normalised space)."""
    mean_t = images.new_tensor(mean).view(1, -1, 1, 1)
    std_t = images.new_tensor(std).view(1, -1, 1, 1)
    out = (images - mean_t) / std_t
    return out * valid if valid is not None else out


def valid_region(image_sizes, shape, device, dtype) -> torch.Tensor | None:
    """(B, 1, H, W) 1 inside each image's valid (unpadded) region, 0 in the padding;
    None when every image fills the canvas. ``image_sizes`` may also be that (B, 1, H, W)
    mask itself (the ONNX export passes the valid region as graph data)."""
    if isinstance(image_sizes, torch.Tensor):
        return image_sizes.to(device=device, dtype=dtype)
    b, _, h, w = shape
    if image_sizes is None or all(tuple(s) == (h, w) for s in image_sizes):
        return None
    valid = torch.zeros(b, 1, h, w, device=device, dtype=dtype)
    for i, (vh, vw) in enumerate(image_sizes):
        valid[i, :, :vh, :vw] = 1
    return valid
