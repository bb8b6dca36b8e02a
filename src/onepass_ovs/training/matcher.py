"""Bipartite matching of mask proposals to ground-truth masks (MaskFormer stage 2).

Mask costs are computed at the *prediction* resolution ``(h, w)``: target masks are
area-averaged down to it (soft targets in [0, 1], so thin structures are not lost the
way nearest-neighbour downsampling loses them). The costs are linear in the target,
so every cost is one ``(N, hw) @ (hw, T)`` product per image; no Python loop runs over
prediction-target pairs. scipy (the ``train`` extra) is imported on first use.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["HungarianMatcher", "resize_masks"]


def resize_masks(masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Masks ``(T, H, W)`` (bool or float) -> float ``(T, h, w)`` by area averaging."""
    masks = masks.float()
    if tuple(masks.shape[-2:]) == tuple(size):
        return masks
    return F.adaptive_avg_pool2d(masks.unsqueeze(1), size).squeeze(1)


def _linear_sum_assignment(cost: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        from scipy.optimize import linear_sum_assignment
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "Hungarian matching needs scipy: pip install 'onepass-ovs[train]'"
        ) from err
    rows, cols = linear_sum_assignment(cost.cpu().numpy())
    return torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)


class HungarianMatcher:
    """One-to-one assignment of N predictions to T targets per image.

    ``cost[n, t] = -cost_class * softmax(class_logits[n])[label_t]
    + cost_mask * mask_cost(mask_logits[n], mask_t) + cost_dice * dice(n, t)``,
    where ``mask_cost`` is the sigmoid focal loss (alpha, gamma) or the binary cross
    entropy averaged over pixels, and ``dice = 1 - (2 p.t + 1) / (sum p + sum t + 1)``
    with ``p = sigmoid(mask_logits)``.

    Call: ``matcher(class_logits (B, N, K+1), mask_logits (B, N, h, w), targets)`` with
    ``targets`` a list of B dicts ``{"labels": int64 (T,), "masks": (T, H, W)}``.
    Returns B pairs ``(pred_idx int64 (M,), target_idx int64 (M,))``, ``M = min(N, T)``,
    sorted by ``pred_idx``; empty for an image without targets.
    """

    def __init__(
        self,
        cost_class: float = 1.0,
        cost_mask: float = 20.0,
        cost_dice: float = 1.0,
        *,
        mask_cost: str = "focal",
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
    ) -> None:
        if mask_cost not in ("focal", "bce"):
            raise ValueError(f"mask_cost must be 'focal' or 'bce', got {mask_cost!r}")
        if cost_class == 0 and cost_mask == 0 and cost_dice == 0:
            raise ValueError("all matching costs are zero")
        self.cost_class = cost_class
        self.cost_mask = cost_mask
        self.cost_dice = cost_dice
        self.mask_cost = mask_cost
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma

    @torch.no_grad()
    def cost_matrix(
        self,
        class_logits: torch.Tensor,
        mask_logits: torch.Tensor,
        labels: torch.Tensor,
        masks: torch.Tensor,
    ) -> torch.Tensor:
        """Matching cost of one image: ``(N, K+1), (N, h, w), (T,), (T, H, W) -> (N, T)``."""
        num_preds = class_logits.shape[0]
        if labels.numel() == 0:
            return class_logits.new_zeros((num_preds, 0), dtype=torch.float32)
        # float32 on purpose: under autocast, half-precision sums over hw pixels drift.
        probs = class_logits.float().softmax(-1)
        cost = -self.cost_class * probs[:, labels.to(probs.device)]

        size = tuple(mask_logits.shape[-2:])
        logits = mask_logits.float().flatten(1)  # (N, hw)
        target = resize_masks(masks.to(logits.device), size).flatten(1)  # (T, hw)
        num_pixels = logits.shape[1]
        if self.cost_mask:
            neg_log_p = F.softplus(-logits)  # -log sigmoid(x)
            neg_log_1mp = F.softplus(logits)  # -log (1 - sigmoid(x))
            if self.mask_cost == "focal":
                p = logits.sigmoid()
                alpha, gamma = self.focal_alpha, self.focal_gamma
                pos = alpha * (1 - p).pow(gamma) * neg_log_p
                neg = (1 - alpha) * p.pow(gamma) * neg_log_1mp
            else:
                pos, neg = neg_log_p, neg_log_1mp
            mask_cost = (pos @ target.T + neg @ (1 - target).T) / num_pixels
            cost = cost + self.cost_mask * mask_cost
        if self.cost_dice:
            p = logits.sigmoid()
            numerator = 2 * (p @ target.T)
            denominator = p.sum(-1, keepdim=True) + target.sum(-1).unsqueeze(0)
            cost = cost + self.cost_dice * (1 - (numerator + 1) / (denominator + 1))
        return cost

    @torch.no_grad()
    def __call__(
        self,
        class_logits: torch.Tensor,
        mask_logits: torch.Tensor,
        targets: Sequence[dict],
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        if len(targets) != class_logits.shape[0]:
            raise ValueError(
                f"{len(targets)} targets for a batch of {class_logits.shape[0]} predictions"
            )
        indices = []
        for b, target in enumerate(targets):
            cost = self.cost_matrix(
                class_logits[b], mask_logits[b], target["labels"], target["masks"]
            )
            if cost.shape[1] == 0:
                empty = torch.zeros(0, dtype=torch.int64)
                indices.append((empty, empty.clone()))
                continue
            if not torch.isfinite(cost).all():
                raise FloatingPointError(f"non-finite matching cost in image {b}")
            indices.append(_linear_sum_assignment(cost))
        return indices
