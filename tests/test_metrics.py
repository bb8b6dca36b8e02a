"""Confusion matrix, mIoU and seen/unseen/hIoU against hand-computed examples."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from onepass_ovs.data import IGNORE_INDEX
from onepass_ovs.evaluation import UNKNOWN, ConfusionMatrix, seen_unseen

# 3 classes; one ignore pixel (bottom right) and one "unknown" prediction.
TARGET = np.array([[0, 0, 1], [1, 2, IGNORE_INDEX]])
PRED = np.array([[0, 1, 1], [UNKNOWN, 2, 0]])
# Rows = ground truth, columns = prediction 0, 1, 2, unknown. The ignore pixel is dropped
# although its prediction (0) would otherwise be a false positive of class 0.
HAND_COUNTS = np.array(
    [
        [1, 1, 0, 0],
        [0, 1, 0, 1],
        [0, 0, 1, 0],
    ]
)


def test_counts_and_metrics_match_hand_computation():
    cm = ConfusionMatrix(3)
    cm.update(PRED, TARGET)
    np.testing.assert_array_equal(cm.counts, HAND_COUNTS)

    result = cm.compute()
    # IoU = TP / (GT + Pred - TP); the unknown pixel counts in GT of class 1 only.
    # class 0: 1 / (2 + 1 - 1); class 1: 1 / (2 + 2 - 1); class 2: 1 / (1 + 1 - 1)
    np.testing.assert_allclose(result["per_class"], [50.0, 100 / 3, 100.0])
    assert result["miou"] == pytest.approx((50.0 + 100 / 3 + 100.0) / 3)
    assert result["pixel_accuracy"] == pytest.approx(60.0)  # 3 of 5 labelled pixels
    assert result["mean_accuracy"] == pytest.approx((50.0 + 50.0 + 100.0) / 3)
    np.testing.assert_allclose(result["per_class_accuracy"], [50.0, 50.0, 100.0])


def test_absent_classes_are_nan_and_false_positives_count():
    cm = ConfusionMatrix(4)
    # class 2 never in GT but predicted once -> IoU 0 (counted in the mean),
    # class 3 absent from both -> NaN (left out of the mean).
    cm.update(np.array([0, 0, 1, 2]), np.array([0, 0, 1, 1]))
    result = cm.compute()
    iou = result["per_class"]
    assert iou[0] == pytest.approx(100.0)
    assert iou[1] == pytest.approx(50.0)  # TP 1, GT 2, Pred 1
    assert iou[2] == 0.0
    assert math.isnan(iou[3])
    assert result["miou"] == pytest.approx((100.0 + 50.0 + 0.0) / 3)
    # accuracy is defined only where the class is in the ground truth
    acc = result["per_class_accuracy"]
    assert math.isnan(acc[2]) and math.isnan(acc[3])
    assert result["mean_accuracy"] == pytest.approx((100.0 + 50.0) / 2)


def test_empty_matrix_gives_nan():
    result = ConfusionMatrix(2).compute()
    assert math.isnan(result["miou"]) and math.isnan(result["pixel_accuracy"])


def test_matches_slow_loop_on_random_batches():
    rng = np.random.default_rng(0)
    k = 5
    target = rng.integers(-1, k, size=(3, 17, 13))  # -1 = ignore
    pred = rng.integers(-1, k, size=(3, 17, 13))  # -1 = unknown
    slow = np.zeros((k, k + 1), dtype=np.int64)
    for t, p in zip(target.ravel(), pred.ravel(), strict=True):
        if t != IGNORE_INDEX:
            slow[t, k if p == UNKNOWN else p] += 1
    cm = ConfusionMatrix(k)
    cm.update(pred, target)
    np.testing.assert_array_equal(cm.counts, slow)

    # streaming: image by image equals the whole batch at once
    streamed = ConfusionMatrix(k)
    for p, t in zip(pred, target, strict=True):
        streamed.update(p, t)
    np.testing.assert_array_equal(streamed.counts, slow)

    # torch input (any integer dtype) counts the same
    from_torch = ConfusionMatrix(k)
    from_torch.update(torch.from_numpy(pred).int(), torch.from_numpy(target))
    np.testing.assert_array_equal(from_torch.counts, slow)


def test_merge_and_add_equal_a_single_matrix():
    rng = np.random.default_rng(1)
    preds = rng.integers(0, 4, size=(4, 8, 8))
    targets = rng.integers(-1, 4, size=(4, 8, 8))
    whole = ConfusionMatrix(4)
    whole.update(preds, targets)

    shard_a, shard_b = ConfusionMatrix(4), ConfusionMatrix(4)
    shard_a.update(preds[:2], targets[:2])
    shard_b.update(preds[2:], targets[2:])
    added = shard_a + shard_b
    np.testing.assert_array_equal(added.counts, whole.counts)
    assert added is not shard_a
    np.testing.assert_array_equal(shard_a.merge(shard_b).counts, whole.counts)

    with pytest.raises(ValueError, match="cannot merge"):
        ConfusionMatrix(4).merge(ConfusionMatrix(5))


def test_invalid_values_are_errors_not_silently_dropped():
    cm = ConfusionMatrix(3)
    with pytest.raises(ValueError, match="target values \\[255\\]"):
        cm.update(np.zeros(2, dtype=np.int64), np.array([0, 255]))
    with pytest.raises(ValueError, match="prediction values \\[7\\]"):
        cm.update(np.array([0, 7]), np.array([0, 1]))
    with pytest.raises(ValueError, match="differ in shape"):
        cm.update(np.zeros(3), np.zeros(2))
    with pytest.raises(ValueError, match="also a class id"):
        ConfusionMatrix(3, ignore_index=2)
    assert cm.counts.sum() == 0


def test_custom_ignore_index_with_uint8_maps():
    cm = ConfusionMatrix(3, ignore_index=255)
    cm.update(np.array([1, 2, 0], dtype=np.uint8), np.array([1, 255, 0], dtype=np.uint8))
    assert cm.counts.sum() == 2
    assert cm.compute()["pixel_accuracy"] == pytest.approx(100.0)


def test_seen_unseen_harmonic_mean():
    per_class = [50.0, 30.0, float("nan"), 10.0]
    result = seen_unseen(per_class, unseen_ids=[1, 3])
    assert result["miou_seen"] == pytest.approx(50.0)  # NaN class 2 left out
    assert result["miou_unseen"] == pytest.approx(20.0)
    assert result["hiou"] == pytest.approx(2 * 50 * 20 / 70)

    assert seen_unseen([0.0, 0.0], [1])["hiou"] == 0.0
    assert math.isnan(seen_unseen([40.0, 20.0], [])["hiou"])
    with pytest.raises(ValueError, match="out of range"):
        seen_unseen([1.0, 2.0], [2])


def test_end_to_end_percent_scale():
    cm = ConfusionMatrix(2)
    cm.update(np.array([[0, 1], [1, 1]]), np.array([[0, 1], [1, 0]]))
    result = cm.compute()
    # class 0: TP 1, GT 2, Pred 1 -> 50 %; class 1: TP 2, GT 2, Pred 3 -> 66.7 %
    np.testing.assert_allclose(result["per_class"], [50.0, 200 / 3])
    split = seen_unseen(result["per_class"], [1])
    assert split["hiou"] == pytest.approx(2 * 50 * (200 / 3) / (50 + 200 / 3))
