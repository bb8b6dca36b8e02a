"""Ray Data batch inference: a stateful callable class for ``Dataset.map_batches``.

    import ray
    from onepass_ovs.integrations.ray import Segment

    ds = ray.data.read_images("s3://bucket/images/", mode="RGB", include_paths=True)
    ds = ds.map_batches(
        Segment,
        fn_constructor_kwargs={"model": "demo", "vocabulary": ["red circle", "background"]},
        batch_size=16, concurrency=2, num_gpus=0,   # num_gpus=1 per actor on a GPU cluster
    )

Each actor builds the Segmenter and encodes the vocabulary once (``__init__``); every
batch then costs only the image passes. Output columns (per row):

- ``label_map``: (H, W) int32 class indices into the vocabulary at the image's own size
  (-1 = unknown, only with ``unknown_threshold`` and no ``background``); rows of one batch
  may have different sizes (Ray stores them as a variable-shaped tensor column);
- ``class_fractions``: a JSON string ``{"class name": fraction of pixels}`` for the
  classes present, largest first (``"unknown"`` for -1); a string column because the
  vocabulary's names are not valid or stable column names and Parquet stores it as is;
- every other input column (e.g. ``path`` from ``include_paths=True``) passes through;
  the ``image`` column is dropped unless ``keep_image=True`` (it is the bulk of a batch).

See docs/ray.md and examples/ray_batch.py for the full recipe (label-map PNGs +
per-image class fractions in Parquet, resumable). Needs ``pip install 'onepass-ovs[ray]'``
for Ray itself; this module imports nothing from Ray.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

LABEL_MAP_COLUMN = "label_map"
FRACTIONS_COLUMN = "class_fractions"


def load_segmenter(model, *, device=None, dtype=None):
    """A Segmenter from a name or folder: an ONNX folder (``onnx.json``) -> onnxruntime,
    anything else -> :meth:`Segmenter.from_pretrained` (presets, ``hf-hub:``, ``clip:``,
    saved folders). A Segmenter passes through (Ray pickles it to each actor; prefer names)."""
    from ..segmenter import Segmenter

    if isinstance(model, Segmenter):
        return model if device is None else model.to(device=device, dtype=dtype)
    if not isinstance(model, (str, os.PathLike)):
        raise TypeError(f"model must be a name, a folder or a Segmenter, got {type(model).__name__}")
    folder = Path(model)
    if folder.is_dir() and (folder / "onnx.json").is_file():
        return Segmenter.from_onnx(folder)
    return Segmenter.from_pretrained(model, device=device, dtype=dtype)


def batch_images(column) -> list[np.ndarray]:
    """Ray's image column -> a list of (H, W[, C]) arrays: a stacked (N, H, W, C) array
    (all one size), an object array of arrays (mixed sizes) or a plain list."""
    if isinstance(column, np.ndarray) and column.dtype != object:
        if column.ndim not in (3, 4):
            raise ValueError(
                f"image column must hold (H, W[, C]) images; got an array of shape {column.shape}"
            )
        return list(column)
    return [np.asarray(image) for image in column]


class Segment:
    """``map_batches`` callable: {``image``: images, ...} -> {``label_map``, ``class_fractions``, ...}.

    Args:
        model: a preset name (``"demo"``), ``"hf-hub:org/repo"``, ``"clip:..."``, a saved
            folder, or an ONNX folder from ``seg.export_onnx`` (run on onnxruntime).
        vocabulary: class names (``"a, b"`` = one class with two synonyms).
        device, dtype: for torch models (default: CUDA when the actor has a GPU).
        image_column: the input column (``read_images`` names it ``image``).
        keep_image: also return the input images.
        batch_size: images per forward pass inside the actor (Ray's ``batch_size`` is
            how many rows the actor receives per call).
        **segment_options: passed to :meth:`Segmenter.segment` (``unknown_threshold``,
            ``background``, ``size``, ``sliding_window``).
    """

    def __init__(
        self,
        model="demo",
        vocabulary: Sequence[str] = (),
        *,
        device=None,
        dtype=None,
        image_column: str = "image",
        keep_image: bool = False,
        batch_size: int = 8,
        **segment_options: Any,
    ):
        from ..text import parse_vocabulary

        self.vocabulary = [vocabulary] if isinstance(vocabulary, str) else list(vocabulary)
        parse_vocabulary(self.vocabulary)  # fail in the constructor, not on the first batch
        allowed = {"unknown_threshold", "background", "size", "sliding_window", "image_format"}
        unknown = set(segment_options) - allowed
        if unknown:
            raise TypeError(f"unknown Segment options {sorted(unknown)}; allowed: {sorted(allowed)}")
        self.segmenter = load_segmenter(model, device=device, dtype=dtype)
        self.image_column = image_column
        self.keep_image = keep_image
        self.batch_size = batch_size
        self.segment_options = segment_options
        # encode the vocabulary once per actor (the model's text cache keeps it)
        self.segmenter.encode_text(self.vocabulary)

    def __call__(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        if self.image_column not in batch:
            raise KeyError(
                f"batch has no {self.image_column!r} column (columns: {sorted(batch)}); "
                "pass image_column= to Segment"
            )
        images = batch_images(batch[self.image_column])
        results = self.segmenter.segment(
            images, self.vocabulary, batch_size=self.batch_size, progress=False,
            **self.segment_options,
        ) if images else []
        out: dict[str, Any] = {
            key: value for key, value in batch.items()
            if key != self.image_column or self.keep_image
        }
        label_maps = np.empty(len(results), dtype=object)
        label_maps[:] = [r.label_map for r in results]
        if len({m.shape for m in label_maps}) <= 1 and len(label_maps):
            label_maps = np.stack(list(label_maps))  # one size: a plain (N, H, W) array
        out[LABEL_MAP_COLUMN] = label_maps
        out[FRACTIONS_COLUMN] = np.array([json.dumps(r.fractions()) for r in results], dtype=object)
        return out


def label_map_png(label_map: np.ndarray, path: str | os.PathLike) -> Path:
    """Write an (H, W) label map as an 8-bit (< 255 classes) or 16-bit PNG, unknown (-1)
    as 255 / 65535, atomically (a temporary file renamed), so a crash never leaves a
    half-written file that a resumed run would skip."""
    from PIL import Image

    path = Path(path)
    labels = np.asarray(label_map)
    if labels.ndim != 2:
        raise ValueError(f"label map must be (H, W), got shape {labels.shape}")
    if labels.max(initial=0) < 255:
        pixels = np.where(labels < 0, 255, labels).astype(np.uint8)
    else:
        pixels = np.where(labels < 0, 65535, labels).astype(np.uint16)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    Image.fromarray(pixels).save(partial, format="PNG")
    os.replace(partial, path)
    return path


__all__ = ["Segment", "batch_images", "label_map_png", "load_segmenter",
           "LABEL_MAP_COLUMN", "FRACTIONS_COLUMN"]
