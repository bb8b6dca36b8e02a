"""Evaluate a segmenter on a labelled dataset: mIoU, per-class IoU, seen/unseen/hIoU.

The vocabulary is the dataset's class list, in its order (synonyms ``"a, b"`` as one
class), so prediction ids and label ids agree. Every image is segmented at the model's
own resolution policy and its label map compared with the mask at the image's size.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from typing import Any

from .metrics import ConfusionMatrix, seen_unseen


def evaluate(
    segmenter,
    dataset: Any,
    *,
    unseen: Iterable[str] | None = None,
    batch_size: int = 4,
    progress: bool | None = None,
    limit: int | None = None,
) -> dict[str, Any]:
    """Stream ``dataset`` through ``segmenter`` into a confusion matrix.

    Args:
        segmenter: a :class:`~onepass_ovs.Segmenter`.
        dataset: a :class:`~onepass_ovs.data.FolderDataset` (or COCO-Stuff) built
            *without* ``unseen``: every class must be labelled to be scored.
        unseen: class names (any synonym, case-insensitive) reported as the unseen split.
        batch_size: images per forward pass.
        progress: show a progress bar (default: for more than 8 images).
        limit: evaluate only the first ``limit`` images.

    Returns a dict, every metric in percent (0-100): ``miou``, ``per_class``
    (``{class name: IoU}``, NaN for a class absent from ground truth and prediction),
    ``pixel_accuracy``, ``mean_accuracy``; with ``unseen`` also ``miou_seen``,
    ``miou_unseen``, ``hiou`` and ``unseen`` (the classes); plus ``num_images``,
    ``seconds`` and ``images_per_second`` (model time, image decoding excluded).
    """
    from ..data.classes import resolve_unseen

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if getattr(dataset, "unseen_ids", None):
        raise ValueError(
            "evaluate needs every class labelled: build the dataset without unseen= and "
            "pass the unseen classes to evaluate(unseen=...) instead"
        )
    classes = list(dataset.classes)
    unseen_ids = resolve_unseen(classes, list(unseen)) if unseen is not None else None
    count = len(dataset) if limit is None else max(0, min(limit, len(dataset)))
    if count == 0:
        raise ValueError("nothing to evaluate: the dataset is empty (or limit is 0)")

    matrix = ConfusionMatrix(len(classes))
    bar = None
    if progress or (progress is None and count > 8):
        from tqdm.auto import tqdm

        bar = tqdm(total=count, desc="evaluate", unit="img")
    seconds = 0.0
    try:
        for start in range(0, count, batch_size):
            images, labels = [], []
            for index in range(start, min(start + batch_size, count)):
                image, label = dataset.load(index)
                images.append(image)
                labels.append(label)
            begin = time.perf_counter()
            results = segmenter.segment(images, classes, batch_size=batch_size, progress=False)
            seconds += time.perf_counter() - begin
            for result, label in zip(results, labels, strict=True):
                matrix.update(result.label_map, label.numpy())
            if bar is not None:
                bar.update(len(images))
    finally:
        if bar is not None:
            bar.close()

    metrics = matrix.compute()
    out: dict[str, Any] = {
        "miou": metrics["miou"],
        "per_class": dict(zip(classes, metrics["per_class"], strict=True)),
        "pixel_accuracy": metrics["pixel_accuracy"],
        "mean_accuracy": metrics["mean_accuracy"],
    }
    if unseen_ids is not None:
        out.update(seen_unseen(metrics["per_class"], unseen_ids))
        out["unseen"] = [classes[i] for i in unseen_ids]
    out["num_images"] = count
    out["seconds"] = seconds
    out["images_per_second"] = count / seconds if seconds > 0 else math.inf
    return out


def to_json_safe(value: Any) -> Any:
    """NaN / infinity -> None, recursively, so the result is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: to_json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_json_safe(v) for v in value]
    return value
