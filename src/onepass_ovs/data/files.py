"""Image and mask files, and the label rule that maps masks to label maps.

Label rule (files and memory)
-----------------------------
- In memory a label map is always ``int64`` of shape ``(H, W)``; a pixel is a class id
  in ``[0, num_classes)`` or ``IGNORE_INDEX = -1``. One sentinel for every vocabulary
  size: -1 can never collide with a class id, whereas 255 does above 255 classes.
- On disk a mask is an 8-bit PNG (mode ``L`` or ``P``) whose value 255 means ignore
  (ids 0..254), or a 16-bit PNG (mode ``I;16``) whose value 65535 means ignore (ids
  0..65534; needed above 255 classes). Both map to ``IGNORE_INDEX`` on read, and
  :func:`save_label_png` writes the inverse. A 16-bit file's 255 is class 255, not
  ignore: the ignore value follows the file's bit depth, never the class count.
  A 32-bit integer image (mode ``I``) is read like a 16-bit one; a negative value in it
  is an error, never a label.
- Unseen classes (the open-vocabulary protocol) become ``IGNORE_INDEX`` on read.
- Masks are aligned with the stored pixel grid: EXIF orientation is *not* applied to
  images here, because masks carry no EXIF and were drawn on the stored pixels.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from . import IGNORE_INDEX
from .classes import DatasetError

__all__ = ["IMAGE_EXTENSIONS", "read_image", "read_label", "save_label_png"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
FILE_IGNORE_8BIT = 255
FILE_IGNORE_16BIT = 65535

# What a broken or hostile file raises while decoding, besides OSError (Pillow's own
# DecompressionBombError is a subclass of Exception only).
_DECODE_ERRORS = (
    OSError,
    UnidentifiedImageError,
    ValueError,
    SyntaxError,
    Image.DecompressionBombError,
)


def read_image(path: str | os.PathLike) -> torch.Tensor:
    """Read an image file as uint8 RGB ``(3, H, W)``; any PIL mode is converted."""
    try:
        with Image.open(path) as img:
            rgb = np.asarray(img.convert("RGB"))
    except _DECODE_ERRORS as err:
        raise DatasetError(f"cannot read image {path}: {err}") from err
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1).contiguous()


def _read_mask_file(path: Path) -> tuple[np.ndarray, int]:
    """Raw mask values ``(H, W)`` and the file's ignore value (by bit depth)."""
    try:
        with Image.open(path) as img:
            mode = img.mode
            raw = np.asarray(img)
    except _DECODE_ERRORS as err:
        raise DatasetError(f"cannot read mask {path}: {err}") from err
    if mode in ("L", "P", "1"):
        return raw.astype(np.int64), FILE_IGNORE_8BIT
    if mode.startswith("I;16") or mode == "I":
        return raw.astype(np.int64), FILE_IGNORE_16BIT
    raise DatasetError(
        f"mask {path} has PIL mode {mode!r}; expected a single-channel 8-bit (L/P) "
        "or 16-bit (I;16) PNG of class ids"
    )


def read_label(
    path: str | os.PathLike,
    num_classes: int,
    *,
    unseen_ids: Iterable[int] = (),
) -> torch.Tensor:
    """Read a mask file as an int64 label map ``(H, W)`` following the module's rule.

    Values ``>= num_classes`` (other than the file's ignore value) and negative values
    are an error naming the file and the offending ids; ``unseen_ids`` become
    ``IGNORE_INDEX``.
    """
    path = Path(path)
    raw, file_ignore = _read_mask_file(path)
    negative = raw < 0
    if negative.any():
        bad = np.unique(raw[negative])[:10].tolist()
        raise DatasetError(
            f"mask {path} has negative class ids {bad}; class ids are 0..{num_classes - 1} "
            f"and ignore is {file_ignore} in this file"
        )
    valid = raw != file_ignore
    beyond = valid & (raw >= num_classes)
    if beyond.any():
        bad = np.unique(raw[beyond])[:10].tolist()
        hint = " (16-bit masks use 65535 for ignore)" if file_ignore == FILE_IGNORE_16BIT else ""
        raise DatasetError(
            f"mask {path} has class ids {bad} beyond the {num_classes} classes{hint}"
        )
    label = np.where(valid, raw, IGNORE_INDEX)
    unseen = np.fromiter(unseen_ids, dtype=np.int64)
    if unseen.size:
        label[np.isin(label, unseen)] = IGNORE_INDEX
    return torch.from_numpy(label)


def save_label_png(path: str | os.PathLike, label: torch.Tensor | np.ndarray) -> None:
    """Write a label map ``(H, W)`` (ids and ``IGNORE_INDEX``) as a mask PNG.

    8-bit when every id is below 255, otherwise 16-bit; ignore becomes 255 / 65535.
    """
    arr = label.detach().cpu().numpy() if isinstance(label, torch.Tensor) else np.asarray(label)
    if arr.ndim != 2:
        raise ValueError(f"label must be (H, W), got shape {arr.shape}")
    arr = arr.astype(np.int64)
    ids = arr[arr != IGNORE_INDEX]
    if ids.size and (ids.min() < 0 or ids.max() >= FILE_IGNORE_16BIT):
        raise ValueError(f"label ids must lie in [0, 65535) or be {IGNORE_INDEX}")
    if ids.size == 0 or ids.max() < FILE_IGNORE_8BIT:
        out = np.where(arr == IGNORE_INDEX, FILE_IGNORE_8BIT, arr).astype(np.uint8)
    else:
        out = np.where(arr == IGNORE_INDEX, FILE_IGNORE_16BIT, arr).astype(np.uint16)
    Image.fromarray(out).save(path, format="PNG")
