"""Batching: stacking samples, and label maps as per-class binary masks."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import IGNORE_INDEX

__all__ = ["collate", "semantic_to_instances"]


def collate(batch: Sequence[dict]) -> dict:
    """Stack equal-size items: ``image`` -> float ``(B, 3, S, S)`` in [0, 1],
    ``label`` -> int64 ``(B, S, S)``; other tensors are stacked, other values listed.
    """
    if not batch:
        raise ValueError("cannot collate an empty batch")
    out: dict = {}
    for key in batch[0]:
        values = [item[key] for item in batch]
        if isinstance(values[0], torch.Tensor):
            shapes = {tuple(v.shape) for v in values}
            if len(shapes) > 1:
                raise ValueError(
                    f"collate needs equal-size {key!r} tensors, got shapes {sorted(shapes)}; "
                    "crop to a fixed size first"
                )
            stacked = torch.stack(values)
            if key == "image" and stacked.dtype == torch.uint8:
                stacked = stacked.float().div_(255.0)
            out[key] = stacked
        elif isinstance(values[0], int | float) and not isinstance(values[0], bool):
            out[key] = torch.tensor(values)
        else:
            out[key] = values
    return out


def semantic_to_instances(
    label: torch.Tensor, ignore_index: int = IGNORE_INDEX
) -> tuple[torch.Tensor, torch.Tensor]:
    """One binary mask per present class of a label map ``(H, W)``.

    Returns ``classes`` int64 ``(T,)`` ascending and ``masks`` bool ``(T, H, W)``;
    ignore pixels belong to no mask.
    """
    if label.dim() != 2:
        raise ValueError(f"label must be (H, W), got shape {tuple(label.shape)}")
    classes = torch.unique(label)
    classes = classes[classes != ignore_index].long()
    masks = label.unsqueeze(0) == classes.view(-1, 1, 1)
    return classes, masks
