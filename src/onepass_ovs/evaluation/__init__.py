"""Evaluation: streaming confusion matrix, mIoU and the seen/unseen/hIoU protocol.

:func:`evaluate` (a segmenter over a labelled dataset) is imported on first access, so
importing this package stays numpy-only.
"""

from typing import Any

from onepass_ovs.evaluation.metrics import UNKNOWN, ConfusionMatrix, seen_unseen

__all__ = ["UNKNOWN", "ConfusionMatrix", "evaluate", "seen_unseen"]


def __getattr__(name: str) -> Any:
    if name == "evaluate":
        from onepass_ovs.evaluation.evaluate import evaluate

        globals()["evaluate"] = evaluate
        return evaluate
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
