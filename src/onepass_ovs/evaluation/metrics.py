"""Streaming semantic-segmentation metrics: confusion matrix, mIoU, seen/unseen/hIoU.

Every metric is reported in **percent (0-100)**, as the papers report them.

Conventions:
- ground truth: class ids in ``[0, K)``, or ``ignore_index`` (dropped);
- prediction: class ids in ``[0, K)``, or ``-1`` = "unknown" (the segmenter's
  ``unknown_threshold``): an unknown pixel is a miss for its ground-truth class and a
  false positive for no class;
- any other value is an error (a stray 255 is never silently treated as ignore).

numpy only; torch tensors are accepted (counted with ``torch.bincount`` on their own
device, so GPU predictions need not be copied out in full).
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Sequence

import numpy as np

from onepass_ovs.data import IGNORE_INDEX

__all__ = ["UNKNOWN", "ConfusionMatrix", "seen_unseen"]

UNKNOWN = -1


def _is_torch(x: object) -> bool:
    # torch cannot have produced x unless it is already imported; avoids importing it.
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def _percent(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """``100 * num / den`` elementwise, NaN where ``den == 0``."""
    out = np.full(numerator.shape, np.nan, dtype=np.float64)
    np.divide(100.0 * numerator, denominator, out=out, where=denominator > 0)
    return out


class ConfusionMatrix:
    """Pixel counts ``counts[gt, pred]`` of shape ``(K, K+1)``; column K = unknown.

    ``update(pred, target)`` takes two arrays of the same shape (numpy or torch, any
    number of dimensions, e.g. ``(H, W)`` or ``(B, H, W)``). Matrices from different
    processes or shards combine with :meth:`merge` / ``+``.
    """

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if 0 <= ignore_index < num_classes:
            raise ValueError(f"ignore_index {ignore_index} is also a class id")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.counts = np.zeros((num_classes, num_classes + 1), dtype=np.int64)

    def reset(self) -> None:
        self.counts[:] = 0

    def update(self, pred, target) -> None:
        """Add one prediction/ground-truth pair (or a batch of them)."""
        if tuple(pred.shape) != tuple(target.shape):
            raise ValueError(
                f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape"
            )
        k = self.num_classes
        if _is_torch(pred) or _is_torch(target):
            self.counts += self._bincount_torch(pred, target)
            return
        pred = np.asarray(pred).astype(np.int64, copy=False).ravel()
        target = np.asarray(target).astype(np.int64, copy=False).ravel()
        keep = target != self.ignore_index
        pred, target = pred[keep], target[keep]
        self._check(pred, target, lambda a: np.unique(a).tolist())
        pred = np.where(pred == UNKNOWN, k, pred)
        flat = np.bincount(target * (k + 1) + pred, minlength=k * (k + 1))
        self.counts += flat.reshape(k, k + 1)

    def _bincount_torch(self, pred, target) -> np.ndarray:
        import torch

        k = self.num_classes
        pred = torch.as_tensor(pred)
        target = torch.as_tensor(target, device=pred.device)
        pred, target = pred.reshape(-1).long(), target.reshape(-1).long()
        keep = target != self.ignore_index
        pred, target = pred[keep], target[keep]
        self._check(pred, target, lambda a: torch.unique(a).tolist())
        pred = torch.where(pred == UNKNOWN, torch.full_like(pred, k), pred)
        flat = torch.bincount(target * (k + 1) + pred, minlength=k * (k + 1))
        return flat.reshape(k, k + 1).cpu().numpy()

    def _check(self, pred, target, unique) -> None:
        k = self.num_classes
        bad_target = (target < 0) | (target >= k)
        if bad_target.any():
            raise ValueError(
                f"target values {unique(target[bad_target])[:10]} are neither class ids in "
                f"[0, {k}) nor ignore_index={self.ignore_index}"
            )
        bad_pred = ((pred < 0) | (pred >= k)) & (pred != UNKNOWN)
        if bad_pred.any():
            raise ValueError(
                f"prediction values {unique(pred[bad_pred])[:10]} are neither class ids in "
                f"[0, {k}) nor {UNKNOWN} (unknown)"
            )

    def merge(self, other: ConfusionMatrix) -> ConfusionMatrix:
        """Add ``other``'s counts into this matrix (in place); returns ``self``."""
        if (other.num_classes, other.ignore_index) != (self.num_classes, self.ignore_index):
            raise ValueError(
                f"cannot merge a {other.num_classes}-class matrix (ignore "
                f"{other.ignore_index}) into a {self.num_classes}-class one (ignore "
                f"{self.ignore_index})"
            )
        self.counts += other.counts
        return self

    def __add__(self, other: ConfusionMatrix) -> ConfusionMatrix:
        out = ConfusionMatrix(self.num_classes, self.ignore_index)
        out.counts = self.counts.copy()
        return out.merge(other)

    def compute(self) -> dict:
        """Metrics in percent.

        Returns ``miou`` (mean over classes with a defined IoU), ``per_class`` (IoU per
        class; NaN for a class absent from both ground truth and prediction),
        ``pixel_accuracy`` (correct / labelled pixels), ``mean_accuracy`` (mean over
        classes present in the ground truth of correct / ground-truth pixels) and
        ``per_class_accuracy`` (NaN where the class is absent from the ground truth).
        With no labelled pixel at all, every value is NaN.
        """
        k = self.num_classes
        true_pos = np.diag(self.counts[:, :k]).astype(np.float64)
        gt_pixels = self.counts.sum(1).astype(np.float64)  # unknown predictions included
        pred_pixels = self.counts[:, :k].sum(0).astype(np.float64)
        union = gt_pixels + pred_pixels - true_pos
        iou = _percent(true_pos, union)
        accuracy = _percent(true_pos, gt_pixels)
        total = self.counts.sum()
        return {
            "miou": _nanmean(iou),
            "per_class": iou.tolist(),
            "pixel_accuracy": float(100.0 * true_pos.sum() / total) if total else float("nan"),
            "mean_accuracy": _nanmean(accuracy),
            "per_class_accuracy": accuracy.tolist(),
        }


def _nanmean(values: np.ndarray) -> float:
    values = np.asarray(values, dtype=np.float64)
    finite = values[~np.isnan(values)]
    return float(finite.mean()) if finite.size else float("nan")


def seen_unseen(per_class_iou: Sequence[float], unseen_ids: Iterable[int]) -> dict:
    """mIoU over seen and unseen classes and their harmonic mean, in the unit of
    ``per_class_iou`` (percent from :meth:`ConfusionMatrix.compute`).

    Classes whose IoU is NaN (absent from ground truth and prediction) are left out of
    the means. ``hiou = 2 S U / (S + U)``; 0 when ``S + U == 0``; NaN when either side
    has no class with a defined IoU.
    """
    iou = np.asarray(per_class_iou, dtype=np.float64)
    unseen = sorted({int(i) for i in unseen_ids})
    if any(i < 0 or i >= iou.size for i in unseen):
        raise ValueError(f"unseen ids {unseen} out of range for {iou.size} classes")
    is_unseen = np.zeros(iou.size, dtype=bool)
    is_unseen[unseen] = True
    seen_miou = _nanmean(iou[~is_unseen])
    unseen_miou = _nanmean(iou[is_unseen])
    if np.isnan(seen_miou) or np.isnan(unseen_miou):
        hiou = float("nan")
    elif seen_miou + unseen_miou == 0:
        hiou = 0.0
    else:
        hiou = 2 * seen_miou * unseen_miou / (seen_miou + unseen_miou)
    return {"miou_seen": seen_miou, "miou_unseen": unseen_miou, "hiou": hiou}
