"""Sliding windows: segment a large working image in overlapping, blended tiles.

A model sees windows of at most ``window`` x ``window`` working pixels, ``stride`` apart;
each window's output is weighted by a ramp across its overlaps and the sum divided by the
summed weights, so a pixel seen by one window keeps that window's value exactly and a
single window reproduces the one-pass result. Memory is bounded by the window, not the
image.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .config import PreprocessConfig
from .images import Geometry, blend_ramp, window_boxes, window_starts

# Windows of one image run together up to batch_size, but at most about this many pixels
# per pass: a 1024 x 1024 DeOP window alone takes ~1.3 GB of activations on CPU.
_WINDOW_PIXELS_PER_PASS = 1024 * 1024


@dataclass(frozen=True)
class Windows:
    """Sliding-window layout in working-resolution pixels (multiples of the pad multiple)."""

    window: int
    stride: int
    blend: str

    def needed(self, padded: tuple[int, int]) -> bool:
        return padded[0] > self.window or padded[1] > self.window


def window_layout(sliding_window, pre: PreprocessConfig) -> Windows | None:
    """The window layout asked for (None: one pass), rounded to the pad multiple.

    ``sliding_window``: None or True (the config's windows), False (one pass), an int
    window side (stride 3/4 of it) or a (window, stride) pair, in working pixels.
    """
    multiple = pre.pad_multiple
    if sliding_window is None or sliding_window is True:
        window, stride = pre.window, pre.window_stride
        if window <= 0:
            if sliding_window is True:
                raise ValueError(
                    "this model's config sets no window: pass sliding_window=<window side>"
                )
            return None
    elif sliding_window is False:
        return None
    elif isinstance(sliding_window, int):
        window, stride = sliding_window, 0
    elif isinstance(sliding_window, (tuple, list)) and len(sliding_window) == 2:
        window, stride = (int(v) for v in sliding_window)
    else:
        raise TypeError(
            "sliding_window must be None, a bool, an int window or a (window, stride) pair, "
            f"got {sliding_window!r}"
        )
    if window <= 0 or stride < 0:
        raise ValueError(f"sliding window sizes must be positive, got {sliding_window!r}")
    window = max(multiple, window // multiple * multiple)
    stride = stride or window * 3 // 4
    stride = min(window, max(multiple, stride // multiple * multiple))
    return Windows(window, stride, pre.window_blend)


def window_chunks(geometry: Geometry, windows: Windows, batch_size: int) -> list[list[tuple]]:
    """The windows (y0, x0, y1, x1) of an image on its padded canvas, grouped into the
    passes :func:`slide` runs: up to ``batch_size`` windows, about a megapixel, per pass."""
    boxes = window_boxes(geometry.padded, windows.window, windows.stride)
    y0, x0, y1, x1 = boxes[0]
    per_pass = max(1, min(batch_size, _WINDOW_PIXELS_PER_PASS // ((y1 - y0) * (x1 - x0))))
    return [boxes[start : start + per_pass] for start in range(0, len(boxes), per_pass)]


def window_valid_sizes(geometry: Geometry, chunk: list[tuple]) -> list[tuple[int, int]]:
    """The valid (unpadded) (h, w) of each window: windows never lie wholly in padding."""
    h1, w1 = geometry.resized
    return [(min(h1 - y0, y1 - y0), min(w1 - x0, x1 - x0)) for y0, x0, y1, x1 in chunk]


def slide(
    run: Callable,
    canvas: torch.Tensor,
    geometry: Geometry,
    windows: Windows,
    batch_size: int,
    multiple: int,
) -> torch.Tensor:
    """Run ``run(batch, valid_sizes, boxes) -> (b, C, h, w)`` on overlapping windows of a
    (3, Hp, Wp) canvas and blend the outputs -> (C, Hp / s, Wp / s), s the output stride.
    """
    chunks = window_chunks(geometry, windows, batch_size)

    def outputs():
        for chunk in chunks:
            batch = torch.stack([canvas[:, y0:y1, x0:x1] for y0, x0, y1, x1 in chunk])
            yield chunk, run(batch, window_valid_sizes(geometry, chunk), chunk)

    return blend_windows(outputs(), geometry, windows, multiple)


def blend_windows(outputs, geometry: Geometry, windows: Windows, multiple: int) -> torch.Tensor:
    """Blend per-window outputs: ``outputs`` yields (boxes, (b, C, h, w) scores or lazy
    scores) per pass, in :func:`window_chunks` order -> (C, Hp / s, Wp / s)."""
    hp, wp = geometry.padded
    total = weights = weight = None
    for chunk, out in outputs:
        if not isinstance(out, torch.Tensor):  # lazy scores (DeOP's assembly): evaluate
            out = out.dense()
        out = out.float().cpu()
        if total is None:
            wh, ww = chunk[0][2] - chunk[0][0], chunk[0][3] - chunk[0][1]
            oh, ow = out.shape[-2:]
            sy, sx = output_stride(wh, oh, multiple), output_stride(ww, ow, multiple)
            overlap = windows.window - windows.stride
            ramp_y = blend_ramp(
                oh, overlap / sy, len(window_starts(hp, wh, windows.stride)) == 1, windows.blend
            )
            ramp_x = blend_ramp(
                ow, overlap / sx, len(window_starts(wp, ww, windows.stride)) == 1, windows.blend
            )
            weight = ramp_y[:, None] * ramp_x[None, :]
            total = torch.zeros(out.shape[1], hp // sy, wp // sx)
            weights = torch.zeros(hp // sy, wp // sx)
        for (y0, x0, _, _), item in zip(chunk, out, strict=True):
            rows = slice(y0 // sy, y0 // sy + oh)
            cols = slice(x0 // sx, x0 // sx + ow)
            total[:, rows, cols] += item * weight
            weights[rows, cols] += weight
    return total / weights


def output_stride(window: int, cells: int, multiple: int) -> int:
    """Pixels per output cell; windows start at multiples of ``multiple``, so it must divide."""
    stride = window // cells if cells else 0
    if not stride or window % cells or multiple % stride:
        raise ValueError(
            f"sliding windows need a model output stride dividing the pad multiple {multiple}; "
            f"a {window}-pixel window gave {cells} cells"
        )
    return stride
