"""Evaluation: streaming confusion matrix, mIoU and the seen/unseen/hIoU protocol."""

from onepass_ovs.evaluation.metrics import UNKNOWN, ConfusionMatrix, seen_unseen

__all__ = ["UNKNOWN", "ConfusionMatrix", "seen_unseen"]
