"""Image inputs: coercion of every accepted type to RGB, the resize/pad policy, and the
layout and blending weights of sliding windows over large images.

Accepted images (colour order is never guessed):

- ``str`` / ``Path``: read with Pillow, EXIF orientation applied, any mode converted to RGB;
- ``PIL.Image``: any mode (RGBA, LA, P, L, I;16, I, F, CMYK, ...), EXIF orientation applied;
- ``np.ndarray``: (H, W, 3) or (H, W) uint8 in [0, 255], or float in [0, 1]; RGB unless
  ``image_format="BGR"``; (H, W, 4) drops alpha;
- ``torch.Tensor``: (3, H, W) or (B, 3, H, W), uint8 or float in [0, 1], RGB unless BGR.

Everything becomes a float32 tensor (3, H, W) in [0, 1], RGB.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .config import PreprocessConfig

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")


class ImageTooLargeError(ValueError):
    """An image file with more pixels than Pillow's decompression-bomb limit allows
    (``PIL.Image.MAX_IMAGE_PIXELS``; raise it, or set it to None, for trusted files)."""


def load_image(path: str | Path):
    """Open an image file as an RGB PIL image; errors name the file."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"image file not found: {path}")
    if path.is_dir():
        raise IsADirectoryError(f"expected an image file, got a directory: {path}")
    try:
        with Image.open(path) as img:
            img.load()
            return pil_to_rgb(img)
    except Image.DecompressionBombError as err:
        raise ImageTooLargeError(
            f"image {path} is too large to open safely (a decompression bomb?): {err} "
            f"For a trusted file raise PIL.Image.MAX_IMAGE_PIXELS (now {Image.MAX_IMAGE_PIXELS})."
        ) from err
    except UnidentifiedImageError as err:
        raise ValueError(f"not an image file (or an unsupported format): {path}") from err
    except (OSError, SyntaxError, ValueError) as err:
        raise ValueError(f"cannot read image {path}: {err}") from err


def pil_to_rgb(img):
    """Any PIL mode -> RGB, with EXIF orientation applied and high bit depths rescaled."""
    from PIL import Image, ImageOps

    img = ImageOps.exif_transpose(img)
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        if mode.startswith("I;16"):
            scale = 65535.0
        else:
            scale = max(float(arr.max()), 1.0) if mode == "I" else 1.0
        arr = np.clip(arr / scale, 0.0, 1.0)
        return Image.fromarray((arr * 255.0 + 0.5).astype(np.uint8), "L").convert("RGB")
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in img.info):
        # composite on white: transparent pixels have no colour of their own
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def to_tensor(image, image_format: str = "RGB") -> list[torch.Tensor]:
    """Coerce one image (or a batch tensor) -> list of (3, H, W) float32 RGB in [0, 1].

    Raises ``ValueError`` for an image without pixels (H or W is 0).
    """
    tensors = _to_tensor(image, image_format)
    for t in tensors:
        if t.shape[-2] == 0 or t.shape[-1] == 0:
            raise ValueError(
                f"image has no pixels: {t.shape[-2]} x {t.shape[-1]} (height x width)"
            )
    return tensors


def to_tensors(images, image_format: str = "RGB", first_index: int | None = 0) -> list[torch.Tensor]:
    """:func:`to_tensor` over a list of images; an error names the bad item.

    ``first_index``: the list position of ``images[0]`` in the caller's list (errors say
    "image 3: ..."); None for a single image (errors unchanged).
    """
    out: list[torch.Tensor] = []
    for offset, image in enumerate(images):
        try:
            out.extend(to_tensor(image, image_format))
        except (TypeError, ValueError, OSError) as err:
            if first_index is None:
                raise
            message = f"image {first_index + offset} of the list: {err}"
            try:
                named = type(err)(message)
            except Exception:  # an exception type with another signature
                named = ValueError(message)
            raise named from err
    return out


def _to_tensor(image, image_format: str) -> list[torch.Tensor]:
    if image_format not in ("RGB", "BGR"):
        raise ValueError(f"image_format must be 'RGB' or 'BGR', got {image_format!r}")
    bgr = image_format == "BGR"
    if isinstance(image, (str, Path)):
        image = load_image(image)
        bgr = False  # files are decoded to RGB
    try:
        from PIL import Image

        if isinstance(image, Image.Image):
            rgb = pil_to_rgb(image)
            arr = np.asarray(rgb, dtype=np.uint8)
            return [torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)]
    except ImportError:  # pragma: no cover - pillow is a dependency
        pass
    if isinstance(image, np.ndarray):
        return [_flip(_array_to_tensor(image), bgr)]
    if isinstance(image, torch.Tensor):
        return [_flip(t, bgr) for t in _tensor_to_tensors(image)]
    raise TypeError(
        f"unsupported image type {type(image).__name__}; expected a path, PIL.Image, "
        "numpy array (H, W, 3) or torch tensor (3, H, W) / (B, 3, H, W)"
    )


def _flip(t: torch.Tensor, bgr: bool) -> torch.Tensor:
    return t.flip(0) if bgr else t


def _as_unit_float(t: torch.Tensor, what: str) -> torch.Tensor:
    if t.dtype == torch.uint8:
        return t.float().div_(255.0)
    if t.dtype == torch.bool or not (t.is_floating_point()):
        raise TypeError(f"{what} must be uint8 or float in [0, 1], got {t.dtype}")
    t = t.float()
    if t.numel() and (not torch.isfinite(t).all() or t.min() < -1e-3 or t.max() > 1 + 1e-3):
        raise ValueError(
            f"float {what} must hold values in [0, 1] (got range "
            f"[{t.min().item():.3g}, {t.max().item():.3g}]); pass uint8 for 0-255 data"
        )
    return t.clamp_(0.0, 1.0)


def _array_to_tensor(arr: np.ndarray) -> torch.Tensor:
    if arr.ndim == 2:
        arr = arr[..., None].repeat(3, axis=2)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise ValueError(f"numpy images must be (H, W), (H, W, 3) or (H, W, 4); got {arr.shape}")
    arr = arr[..., :3]
    if arr.dtype not in (np.uint8,) and not np.issubdtype(arr.dtype, np.floating):
        raise TypeError(f"numpy images must be uint8 or float in [0, 1], got {arr.dtype}")
    arr = np.ascontiguousarray(arr)
    if not arr.flags.writeable:  # e.g. np.asarray(PIL image): torch warns on read-only memory
        arr = arr.copy()
    t = torch.from_numpy(arr).permute(2, 0, 1)
    return _as_unit_float(t, "numpy image")


def _tensor_to_tensors(t: torch.Tensor) -> list[torch.Tensor]:
    t = t.detach().cpu()
    if t.ndim == 3:
        batch = [t]
    elif t.ndim == 4:
        batch = list(t)
    else:
        raise ValueError(f"tensor images must be (3, H, W) or (B, 3, H, W); got {tuple(t.shape)}")
    for item in batch:
        if item.shape[0] != 3:
            raise ValueError(f"tensor images must have 3 channels first; got {tuple(item.shape)}")
    return [_as_unit_float(item, "tensor image") for item in batch]


# -- resize / pad policy -------------------------------------------------------------------


@dataclass(frozen=True)
class Geometry:
    """Where an image went: original (H0, W0) -> resized (H1, W1) -> padded (Hp, Wp)."""

    original: tuple[int, int]
    resized: tuple[int, int]
    padded: tuple[int, int]


def resized_size(
    height: int, width: int, config: PreprocessConfig, size=None
) -> tuple[int, int]:
    """The working size under the resize policy.

    Default: short side -> ``config.short_side``, long side capped at
    ``config.max_long_side`` (aspect ratio kept). ``size`` overrides it: an int sets the
    short side (still capped), a (h, w) pair sets the exact size, ``"original"`` keeps the
    image's own size (sliding windows then bound the memory).
    """
    if isinstance(size, str):
        if size != "original":
            raise ValueError(f"size must be an int, (h, w) or 'original', got {size!r}")
        return height, width
    if size is not None and not isinstance(size, int):
        h, w = size
        if h <= 0 or w <= 0:
            raise ValueError(f"size must be positive, got {size}")
        return int(h), int(w)
    short = int(size) if size is not None else config.short_side
    if short <= 0:
        raise ValueError(f"size must be positive, got {size}")
    scale = short / min(height, width)
    if max(height, width) * scale > config.max_long_side:
        scale = config.max_long_side / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def prepare(image: torch.Tensor, config: PreprocessConfig, size=None) -> tuple[torch.Tensor, Geometry]:
    """(3, H0, W0) in [0, 1] -> resized and zero-padded (3, Hp, Wp), plus its Geometry.

    Normalisation happens in the model (each stream has its own mean/std); padding is
    re-zeroed there in normalised space.
    """
    h0, w0 = image.shape[-2:]
    h1, w1 = resized_size(h0, w0, config, size)
    if (h1, w1) != (h0, w0):
        image = F.interpolate(
            image[None], size=(h1, w1), mode=config.interpolation,
            align_corners=False if config.interpolation != "nearest" else None,
            antialias=config.interpolation in ("bilinear", "bicubic") and (h1 < h0 or w1 < w0),
        )[0].clamp_(0.0, 1.0)
    m = config.pad_multiple
    hp, wp = math.ceil(h1 / m) * m, math.ceil(w1 / m) * m
    if (hp, wp) != (h1, w1):
        image = F.pad(image, (0, wp - w1, 0, hp - h1))
    return image, Geometry((h0, w0), (h1, w1), (hp, wp))


# -- sliding windows -----------------------------------------------------------------------


def window_starts(length: int, window: int, stride: int) -> list[int]:
    """Start offsets of windows covering [0, length): every ``stride``, the last one flush
    with the end (so no window hangs over the canvas). One window when it fits."""
    if window >= length:
        return [0]
    count = math.ceil((length - window) / stride) + 1
    return sorted({min(i * stride, length - window) for i in range(count)})


def window_boxes(
    canvas: tuple[int, int], window: int, stride: int
) -> list[tuple[int, int, int, int]]:
    """(y0, x0, y1, x1) boxes of equal size tiling a (H, W) canvas, row-major.

    Windows are ``window`` x ``window`` (clipped to the canvas), ``stride`` apart.
    """
    height, width = canvas
    wh, ww = min(window, height), min(window, width)
    return [
        (y0, x0, y0 + wh, x0 + ww)
        for y0 in window_starts(height, wh, stride)
        for x0 in window_starts(width, ww, stride)
    ]


def blend_ramp(length: int, ramp: float, single: bool, mode: str = "linear") -> torch.Tensor:
    """Per-cell blending weight (length,) along one side of a window.

    ``linear``: rises from the window edge to 1 over ``ramp`` cells (the overlap with the
    neighbour), so two overlapping windows cross-fade linearly instead of meeting at a
    seam. ``mean`` (or a side with a single window, ``single``): all ones.
    """
    if mode not in ("linear", "mean"):
        raise ValueError(f"window blending must be 'linear' or 'mean', got {mode!r}")
    if mode == "mean" or single or ramp <= 0:
        return torch.ones(length)
    centre = torch.arange(length, dtype=torch.float64) + 0.5
    weight = torch.minimum(centre, length - centre) / ramp
    return weight.clamp_(max=1.0).float()


def list_image_files(paths) -> list[Path]:
    """Expand files and folders (non-recursive, sorted) into image files; errors name paths."""
    out: list[Path] = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            found = sorted(q for q in p.iterdir() if q.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in folder {p}")
            out.extend(found)
        elif p.exists():
            out.append(p)
        else:
            raise FileNotFoundError(f"no such image file or folder: {p}")
    return out
