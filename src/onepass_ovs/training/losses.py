"""Losses of DeOP training: the set criterion of the proposal MaskFormer (stage 2) and
the assembled-map loss of the DeOP heads (stage 3).

All losses are computed in float32 whatever the input dtype (autocast-safe) and return
a dict of named, *unweighted* parts plus ``"loss"``, the weighted total to backprop.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from onepass_ovs.data import IGNORE_INDEX
from onepass_ovs.training.matcher import HungarianMatcher

__all__ = ["sigmoid_focal_loss", "dice_loss", "SetCriterion", "assembled_map_loss"]


def sigmoid_focal_loss(
    logits: torch.Tensor, targets: torch.Tensor, *, alpha: float = 0.25, gamma: float = 2.0
) -> torch.Tensor:
    """Elementwise sigmoid focal loss (no reduction); ``targets`` in [0, 1], same shape.

    ``-alpha t (1-p)^gamma log p - (1-alpha)(1-t) p^gamma log(1-p)``, ``p = sigmoid(x)``,
    with the logs taken as softplus of the logits for stability.
    """
    p = logits.sigmoid()
    pos = alpha * (1 - p).pow(gamma) * F.softplus(-logits)
    neg = (1 - alpha) * p.pow(gamma) * F.softplus(logits)
    return targets * pos + (1 - targets) * neg


def dice_loss(probs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-row dice loss ``(M, P), (M, P) -> (M,)``: ``1 - (2 p.t + 1) / (sum p + sum t + 1)``."""
    numerator = 2 * (probs * targets).sum(-1)
    denominator = probs.sum(-1) + targets.sum(-1)
    return 1 - (numerator + 1) / (denominator + 1)


def _num_masks(targets: Sequence[dict], device: torch.device) -> float:
    """Target masks in the batch, averaged over processes so every rank normalises
    by the same number (otherwise ranks with few masks get larger gradients)."""
    count = torch.tensor(
        float(sum(len(t["labels"]) for t in targets)), dtype=torch.float32, device=device
    )
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(count)
        count = count / torch.distributed.get_world_size()
    return max(float(count), 1.0)


class SetCriterion(nn.Module):
    """Mask-classification loss with Hungarian matching and deep supervision.

    ``forward(outputs, targets)`` with ``outputs = {"class_logits": (B, N, K+1),
    "mask_logits": (B, N, h, w), "aux_outputs": [same two keys per decoder layer]}``
    (``aux_outputs`` optional) and ``targets`` a list of B dicts ``{"labels": int64
    (T,), "masks": (T, H, W)}`` (e.g. from ``semantic_to_instances``).

    Per output level:
    - ``loss_ce``: cross entropy over all N queries, unmatched ones labelled "no object"
      (class K) with weight ``eos_coef``; weighted mean (divided by the sum of weights);
    - ``loss_focal``: sigmoid focal loss of matched masks, mean over pixels, summed over
      masks and divided by the number of target masks;
    - ``loss_dice``: dice loss of matched masks, same normalisation.

    Matched mask logits are upsampled bilinearly to the target size ``(H, W)`` for the
    loss (the matcher itself works at ``(h, w)``). Returned keys: ``loss_ce``,
    ``loss_focal``, ``loss_dice``, then ``loss_ce_{i}`` ... for aux level i, and
    ``loss`` = the weighted sum over all levels. An image without targets contributes
    only its no-object cross entropy.
    """

    def __init__(
        self,
        num_classes: int,
        matcher: HungarianMatcher,
        eos_coef: float = 0.1,
        weight_ce: float = 1.0,
        weight_focal: float = 20.0,
        weight_dice: float = 1.0,
        *,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.matcher = matcher
        self.eos_coef = eos_coef
        self.weights = {"loss_ce": weight_ce, "loss_focal": weight_focal, "loss_dice": weight_dice}
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        class_weight = torch.ones(num_classes + 1)
        class_weight[-1] = eos_coef
        self.register_buffer("class_weight", class_weight, persistent=False)

    def _level_losses(
        self, output: dict, targets: Sequence[dict], num_masks: float
    ) -> dict[str, torch.Tensor]:
        class_logits = output["class_logits"].float()
        mask_logits = output["mask_logits"]
        batch, num_queries, num_channels = class_logits.shape
        if num_channels != self.num_classes + 1:
            raise ValueError(
                f"class_logits has {num_channels} channels, expected num_classes + 1 = "
                f"{self.num_classes + 1}"
            )
        indices = self.matcher(class_logits, mask_logits, targets)

        target_classes = torch.full(
            (batch, num_queries), self.num_classes, dtype=torch.int64, device=class_logits.device
        )
        for b, (pred_idx, tgt_idx) in enumerate(indices):
            target_classes[b, pred_idx.to(class_logits.device)] = targets[b]["labels"][tgt_idx].to(
                class_logits.device
            )
        loss_ce = F.cross_entropy(
            class_logits.transpose(1, 2), target_classes, weight=self.class_weight.float()
        )

        # Keeps the mask branch in the graph when the batch has no targets (DDP needs
        # every parameter to receive a gradient, even a zero one).
        zero = mask_logits.float().sum() * 0.0
        loss_focal, loss_dice = zero, zero
        for b, (pred_idx, tgt_idx) in enumerate(indices):
            if pred_idx.numel() == 0:
                continue
            target_masks = targets[b]["masks"][tgt_idx.to(targets[b]["masks"].device)]
            target_masks = target_masks.to(mask_logits.device).float()
            pred = mask_logits[b, pred_idx.to(mask_logits.device)].float().unsqueeze(1)
            pred = F.interpolate(
                pred, size=target_masks.shape[-2:], mode="bilinear", align_corners=False
            ).squeeze(1)
            pred, target_masks = pred.flatten(1), target_masks.flatten(1)
            focal = sigmoid_focal_loss(
                pred, target_masks, alpha=self.focal_alpha, gamma=self.focal_gamma
            )
            loss_focal = loss_focal + focal.mean(1).sum()
            loss_dice = loss_dice + dice_loss(pred.sigmoid(), target_masks).sum()
        return {
            "loss_ce": loss_ce,
            "loss_focal": loss_focal / num_masks,
            "loss_dice": loss_dice / num_masks,
        }

    def forward(self, outputs: dict, targets: Sequence[dict]) -> dict[str, torch.Tensor]:
        num_masks = _num_masks(targets, outputs["class_logits"].device)
        levels = [outputs, *(outputs.get("aux_outputs") or [])]
        losses: dict[str, torch.Tensor] = {}
        total = outputs["class_logits"].new_zeros((), dtype=torch.float32)
        for level, output in enumerate(levels):
            suffix = "" if level == 0 else f"_{level - 1}"
            for name, value in self._level_losses(output, targets, num_masks).items():
                losses[name + suffix] = value
                total = total + self.weights[name] * value
        losses["loss"] = total
        return losses


def assembled_map_loss(
    mask_logits: torch.Tensor,
    class_logits: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = IGNORE_INDEX,
    focal_weight: float = 2.0,
    dice_weight: float = 0.8,
    *,
    focal_alpha: float = 0.25,
    focal_gamma: float = 2.0,
    sigmoid_before_upsample: bool = False,
) -> dict[str, torch.Tensor]:
    """DeOP stage-3 loss on the assembled semantic map (docs/training.md).

    Args:
        mask_logits: ``(B, N, h, w)`` proposal mask logits M.
        class_logits: ``(B, N, K+1)`` class logits, channel K = void.
        labels: int64 ``(B, H, W)``, ids in ``[0, K)`` or ``ignore_index``.
        sigmoid_before_upsample: ``False`` (default) is the paper's formula
            ``S = sum_n sigmoid(up(M_n)) * softmax(logits_n)``, which materialises the
            upsampled masks ``(B, N, H, W)``. ``True`` uses
            ``S = up(sum_n sigmoid(M_n) * softmax(logits_n))``: bilinear upsampling is
            linear, so this equals ``sum_n up(sigmoid(M_n)) * p_n`` and the sum over N
            runs at mask resolution, saving memory, but it is *not* the paper's formula
            (sigmoid and upsampling do not commute), so it is opt-in.

    ``S`` is ``(B, K+1, H, W)``; ``S_hat = sigmoid(3 S - 3)``. Target: one-hot of the
    label with every ignore pixel moved to the void channel K.
    ``loss_focal`` = sigmoid focal loss of the logits ``3 S - 3`` (alpha, gamma), mean
    over all ``B (K+1) H W`` elements; ``loss_dice`` = per image over ``(K, H, W)``
    (void channel excluded) ``1 - (2 S_hat.T + 1) / (sum S_hat + sum T + 1)``, mean
    over images. ``loss = focal_weight * loss_focal + dice_weight * loss_dice``.
    The one-hot target is never materialised: the target's single 1 per pixel is
    handled by a gather.
    """
    if mask_logits.dim() != 4 or class_logits.shape[:2] != mask_logits.shape[:2]:
        raise ValueError(
            f"mask_logits {tuple(mask_logits.shape)} must be (B, N, h, w) and class_logits "
            f"{tuple(class_logits.shape)} (B, N, K+1)"
        )
    num_channels = class_logits.shape[-1]
    num_classes = num_channels - 1
    size = tuple(labels.shape[-2:])
    probs = class_logits.float().softmax(-1)  # (B, N, K+1)
    if sigmoid_before_upsample:
        assembled = torch.einsum("bnc,bnhw->bchw", probs, mask_logits.float().sigmoid())
        assembled = F.interpolate(assembled, size=size, mode="bilinear", align_corners=False)
    else:
        masks = F.interpolate(mask_logits.float(), size=size, mode="bilinear", align_corners=False)
        assembled = torch.einsum("bnc,bnhw->bchw", probs, masks.sigmoid())

    is_ignore = labels == ignore_index
    valid = is_ignore | ((labels >= 0) & (labels < num_classes))
    if not bool(valid.all()):
        bad = torch.unique(labels[~valid])[:10].tolist()
        raise ValueError(
            f"labels {bad} are neither class ids in [0, {num_classes}) nor "
            f"ignore_index={ignore_index}"
        )
    target = torch.where(is_ignore, torch.full_like(labels, num_classes), labels).long()
    target = target.unsqueeze(1)  # (B, 1, H, W): the channel holding the one-hot 1

    logits = 3 * assembled - 3
    p = logits.sigmoid()
    # Focal of every element as a negative, then swap in the positive term at the
    # target channel: focal(t=1) - focal(t=0) added at one element per pixel.
    negative = (1 - focal_alpha) * p.pow(focal_gamma) * F.softplus(logits)
    logits_at_target = logits.gather(1, target)
    p_at_target = p.gather(1, target)
    positive_at_target = (
        focal_alpha * (1 - p_at_target).pow(focal_gamma) * F.softplus(-logits_at_target)
    )
    loss_focal = (
        negative.sum() + (positive_at_target - negative.gather(1, target)).sum()
    ) / negative.numel()

    is_object = (target < num_classes).float()
    intersection = (p_at_target * is_object).flatten(1).sum(-1)  # (B,)
    sum_probs = p[:, :num_classes].flatten(1).sum(-1)
    sum_targets = is_object.flatten(1).sum(-1)
    loss_dice = (1 - (2 * intersection + 1) / (sum_probs + sum_targets + 1)).mean()
    return {
        "loss_focal": loss_focal,
        "loss_dice": loss_dice,
        "loss": focal_weight * loss_focal + dice_weight * loss_dice,
    }
