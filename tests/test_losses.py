"""Hungarian matcher and losses against brute force and slow, independent formulas."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from onepass_ovs.data import IGNORE_INDEX
from onepass_ovs.training.losses import SetCriterion, assembled_map_loss
from onepass_ovs.training.matcher import HungarianMatcher

pytest.importorskip("scipy")

ALPHA, GAMMA = 0.25, 2.0


# --------------------------------------------------------------------------- slow formulas


def slow_sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def slow_focal(x: float, t: float) -> float:
    p = slow_sigmoid(x)
    return -ALPHA * t * (1 - p) ** GAMMA * math.log(p) - (1 - ALPHA) * (
        1 - t
    ) * p**GAMMA * math.log(1 - p)


def slow_bce(x: float, t: float) -> float:
    p = slow_sigmoid(x)
    return -t * math.log(p) - (1 - t) * math.log(1 - p)


def slow_dice(logits: list[float], targets: list[float]) -> float:
    p = [slow_sigmoid(x) for x in logits]
    inter = sum(a * b for a, b in zip(p, targets, strict=True))
    return 1 - (2 * inter + 1) / (sum(p) + sum(targets) + 1)


def slow_cost(class_logits, mask_logits, labels, masks, weights=(1.0, 20.0, 1.0), pixel="focal"):
    """(N, T) matching cost, pair by pair, masks at the prediction resolution."""
    n_pred, n_tgt = class_logits.shape[0], labels.shape[0]
    cost = torch.zeros(n_pred, n_tgt, dtype=torch.float64)
    pixel_loss = slow_focal if pixel == "focal" else slow_bce
    for n in range(n_pred):
        probs = torch.softmax(class_logits[n].double(), -1)
        xs = mask_logits[n].double().flatten().tolist()
        for t in range(n_tgt):
            ts = masks[t].double().flatten().tolist()
            mask_term = sum(pixel_loss(x, y) for x, y in zip(xs, ts, strict=True)) / len(xs)
            cost[n, t] = (
                -weights[0] * probs[labels[t]].item()
                + weights[1] * mask_term
                + weights[2] * slow_dice(xs, ts)
            )
    return cost


def brute_force_min(cost: torch.Tensor) -> float:
    """Minimum total cost over every injective assignment (all permutations)."""
    n_pred, n_tgt = cost.shape
    best = math.inf
    if n_tgt <= n_pred:
        for preds in itertools.permutations(range(n_pred), n_tgt):
            best = min(best, sum(cost[p, t].item() for t, p in enumerate(preds)))
    else:
        for tgts in itertools.permutations(range(n_tgt), n_pred):
            best = min(best, sum(cost[p, t].item() for p, t in enumerate(tgts)))
    return best


def random_case(generator, batch=2, queries=4, classes=3, size=(5, 6), targets=(3, 4)):
    class_logits = torch.randn(batch, queries, classes + 1, generator=generator) * 2
    mask_logits = torch.randn(batch, queries, *size, generator=generator) * 2
    tgts = []
    for num in targets:
        tgts.append(
            {
                "labels": torch.randint(0, classes, (num,), generator=generator),
                "masks": torch.rand(num, *size, generator=generator) > 0.5,
            }
        )
    return class_logits, mask_logits, tgts


# --------------------------------------------------------------------------- matcher


@pytest.mark.parametrize("pixel", ["focal", "bce"])
def test_matcher_cost_and_assignment_match_brute_force(pixel):
    g = torch.Generator().manual_seed(0)
    for trial in range(4):
        class_logits, mask_logits, targets = random_case(g, targets=(3, 4 if trial % 2 else 2))
        matcher = HungarianMatcher(1.0, 20.0, 1.0, mask_cost=pixel)
        indices = matcher(class_logits, mask_logits, targets)
        for b, (pred_idx, tgt_idx) in enumerate(indices):
            t = targets[b]
            slow = slow_cost(class_logits[b], mask_logits[b], t["labels"], t["masks"], pixel=pixel)
            fast = matcher.cost_matrix(class_logits[b], mask_logits[b], t["labels"], t["masks"])
            torch.testing.assert_close(fast.double(), slow, rtol=1e-5, atol=1e-5)

            assert len(set(pred_idx.tolist())) == len(pred_idx) == len(t["labels"])
            assert sorted(tgt_idx.tolist()) == list(range(len(t["labels"])))
            total = slow[pred_idx, tgt_idx].sum().item()
            assert total == pytest.approx(brute_force_min(slow), abs=1e-6)


def test_matcher_more_targets_than_queries():
    g = torch.Generator().manual_seed(1)
    class_logits, mask_logits, targets = random_case(g, batch=1, queries=2, targets=(4,))
    matcher = HungarianMatcher()
    ((pred_idx, tgt_idx),) = matcher(class_logits, mask_logits, targets)
    assert sorted(pred_idx.tolist()) == [0, 1] and len(set(tgt_idx.tolist())) == 2
    slow = slow_cost(class_logits[0], mask_logits[0], targets[0]["labels"], targets[0]["masks"])
    assert slow[pred_idx, tgt_idx].sum().item() == pytest.approx(brute_force_min(slow), abs=1e-6)


def test_matcher_resizes_targets_to_prediction_resolution():
    g = torch.Generator().manual_seed(2)
    class_logits, mask_logits, targets = random_case(g, batch=1)
    t = targets[0]
    # every target pixel repeated 3x3: area-averaging back gives the same masks
    big = t["masks"].repeat_interleave(3, 1).repeat_interleave(3, 2)
    matcher = HungarianMatcher()
    native = matcher.cost_matrix(class_logits[0], mask_logits[0], t["labels"], t["masks"])
    upsampled = matcher.cost_matrix(class_logits[0], mask_logits[0], t["labels"], big)
    torch.testing.assert_close(native, upsampled)


def test_matcher_image_without_targets():
    g = torch.Generator().manual_seed(3)
    class_logits, mask_logits, _ = random_case(g, batch=1)
    empty = {"labels": torch.zeros(0, dtype=torch.int64), "masks": torch.zeros(0, 5, 6)}
    ((pred_idx, tgt_idx),) = HungarianMatcher()(class_logits, mask_logits, [empty])
    assert pred_idx.numel() == 0 and tgt_idx.numel() == 0


# --------------------------------------------------------------------------- set criterion


def slow_level_losses(class_logits, mask_logits, targets, indices, num_classes, eos_coef):
    """CE / focal / dice of one output level, loop by loop, from given matches."""
    weight_sum, ce_sum = 0.0, 0.0
    focal_sum, dice_sum, num_masks = 0.0, 0.0, 0
    for b, (pred_idx, tgt_idx) in enumerate(indices):
        matched = dict(zip(pred_idx.tolist(), tgt_idx.tolist(), strict=True))
        for n in range(class_logits.shape[1]):
            cls = targets[b]["labels"][matched[n]].item() if n in matched else num_classes
            w = eos_coef if cls == num_classes else 1.0
            log_probs = torch.log_softmax(class_logits[b, n].double(), -1)
            ce_sum += -w * log_probs[cls].item()
            weight_sum += w
        num_masks += len(targets[b]["labels"])
        for n, t in matched.items():
            target = targets[b]["masks"][t].double()
            pred = F.interpolate(
                mask_logits[b, n][None, None].double(),
                size=target.shape,
                mode="bilinear",
                align_corners=False,
            )[0, 0]
            xs, ts = pred.flatten().tolist(), target.flatten().tolist()
            focal_sum += sum(slow_focal(x, y) for x, y in zip(xs, ts, strict=True)) / len(xs)
            dice_sum += slow_dice(xs, ts)
    num_masks = max(num_masks, 1)
    return ce_sum / weight_sum, focal_sum / num_masks, dice_sum / num_masks


def test_set_criterion_matches_slow_formulas_with_deep_supervision():
    g = torch.Generator().manual_seed(4)
    num_classes = 3
    class_logits, mask_logits, targets = random_case(g, queries=5, size=(4, 5), targets=(3, 0))
    # targets at twice the mask resolution: the loss upsamples the predictions
    for t in targets:
        t["masks"] = t["masks"].repeat_interleave(2, 1).repeat_interleave(2, 2)
    aux_class, aux_mask, _ = random_case(g, queries=5, size=(4, 5))
    class_logits.requires_grad_(True)
    mask_logits.requires_grad_(True)
    outputs = {
        "class_logits": class_logits,
        "mask_logits": mask_logits,
        "aux_outputs": [{"class_logits": aux_class, "mask_logits": aux_mask}],
    }
    matcher = HungarianMatcher()
    criterion = SetCriterion(num_classes, matcher, eos_coef=0.1)
    losses = criterion(outputs, targets)

    expected_total = 0.0
    for suffix, (cl, ml) in {"": (class_logits, mask_logits), "_0": (aux_class, aux_mask)}.items():
        indices = matcher(cl, ml, targets)
        ce, focal, dice = slow_level_losses(cl.detach(), ml.detach(), targets, indices, 3, 0.1)
        assert losses[f"loss_ce{suffix}"].item() == pytest.approx(ce, rel=1e-5)
        assert losses[f"loss_focal{suffix}"].item() == pytest.approx(focal, rel=1e-5)
        assert losses[f"loss_dice{suffix}"].item() == pytest.approx(dice, rel=1e-5)
        expected_total += ce + 20 * focal + dice
    assert losses["loss"].item() == pytest.approx(expected_total, rel=1e-5)

    losses["loss"].backward()
    assert torch.isfinite(class_logits.grad).all() and mask_logits.grad.abs().sum() > 0
    # the image without targets only pulls its queries towards "no object"
    assert mask_logits.grad[1].abs().sum() == 0


def test_set_criterion_batch_without_any_target():
    g = torch.Generator().manual_seed(5)
    class_logits, mask_logits, _ = random_case(g, batch=2, size=(4, 4))
    mask_logits.requires_grad_(True)
    empty = {"labels": torch.zeros(0, dtype=torch.int64), "masks": torch.zeros(0, 8, 8)}
    losses = SetCriterion(3, HungarianMatcher())(
        {"class_logits": class_logits, "mask_logits": mask_logits}, [empty, empty]
    )
    expected_ce = F.cross_entropy(class_logits.flatten(0, 1), torch.full((8,), 3))
    assert losses["loss_ce"].item() == pytest.approx(expected_ce.item(), rel=1e-6)
    assert losses["loss_focal"].item() == 0 and losses["loss_dice"].item() == 0
    losses["loss"].backward()  # the mask branch stays in the graph (DDP)
    assert mask_logits.grad is not None and mask_logits.grad.abs().sum() == 0


# --------------------------------------------------------------------------- assembled map


def slow_assembled_loss(mask_logits, class_logits, labels, sigmoid_first=False):
    """docs/methods.md section 1, "Training" written out with an explicit one-hot target, in float64."""
    mask_logits, class_logits = mask_logits.double(), class_logits.double()
    batch, queries = class_logits.shape[:2]
    channels = class_logits.shape[-1]
    void = channels - 1
    height, width = labels.shape[-2:]
    probs = class_logits.softmax(-1)
    assembled = torch.zeros(batch, channels, height, width, dtype=torch.float64)
    for b in range(batch):
        for n in range(queries):
            if sigmoid_first:
                mask = F.interpolate(
                    mask_logits[b, n][None, None].sigmoid(),
                    size=(height, width),
                    mode="bilinear",
                    align_corners=False,
                )[0, 0]
            else:
                mask = F.interpolate(
                    mask_logits[b, n][None, None],
                    size=(height, width),
                    mode="bilinear",
                    align_corners=False,
                )[0, 0].sigmoid()
            for c in range(channels):
                assembled[b, c] += mask * probs[b, n, c]
    s_hat = torch.sigmoid(3 * assembled - 3)
    target_ids = labels.clone()
    target_ids[labels == IGNORE_INDEX] = void
    one_hot = torch.zeros_like(s_hat)
    for b in range(batch):
        for y in range(height):
            for x in range(width):
                one_hot[b, target_ids[b, y, x], y, x] = 1.0
    focal = -ALPHA * one_hot * (1 - s_hat) ** GAMMA * torch.log(s_hat) - (1 - ALPHA) * (
        1 - one_hot
    ) * s_hat**GAMMA * torch.log(1 - s_hat)
    focal = focal.mean()
    dice = 0.0
    for b in range(batch):
        p, t = s_hat[b, :void], one_hot[b, :void]
        dice += 1 - (2 * (p * t).sum() + 1) / (p.sum() + t.sum() + 1)
    dice = dice / batch
    return focal.item(), dice.item()


def assembled_case(seed):
    g = torch.Generator().manual_seed(seed)
    mask_logits = torch.randn(2, 5, 4, 6, generator=g) * 2
    class_logits = torch.randn(2, 5, 4, generator=g) * 2  # K = 3 classes + void
    labels = torch.randint(0, 3, (2, 12, 18), generator=g)
    labels[:, :3, :5] = IGNORE_INDEX
    return mask_logits, class_logits, labels


def test_assembled_map_loss_matches_methods_formula():
    mask_logits, class_logits, labels = assembled_case(6)
    out = assembled_map_loss(mask_logits, class_logits, labels)
    focal, dice = slow_assembled_loss(mask_logits, class_logits, labels)
    assert out["loss_focal"].item() == pytest.approx(focal, rel=1e-5)
    assert out["loss_dice"].item() == pytest.approx(dice, rel=1e-5)
    assert out["loss"].item() == pytest.approx(2.0 * focal + 0.8 * dice, rel=1e-5)


def test_assembled_map_loss_sum_at_mask_resolution_equals_upsample_first():
    mask_logits, class_logits, labels = assembled_case(7)
    # opt-in: sum over N at mask resolution, then upsample the (K+1)-channel map ...
    fast = assembled_map_loss(mask_logits, class_logits, labels, sigmoid_before_upsample=True)
    # ... equals upsampling each sigmoid(M_n) first, then summing (bilinear is linear)
    focal, dice = slow_assembled_loss(mask_logits, class_logits, labels, sigmoid_first=True)
    assert fast["loss_focal"].item() == pytest.approx(focal, rel=1e-5)
    assert fast["loss_dice"].item() == pytest.approx(dice, rel=1e-5)
    # ... but not the paper's sigmoid(up(M)), which is why it is not the default
    exact = assembled_map_loss(mask_logits, class_logits, labels)
    assert abs(exact["loss_focal"].item() - fast["loss_focal"].item()) > 1e-6


def test_assembled_map_loss_prefers_the_right_answer_and_backprops():
    labels = torch.zeros(1, 8, 8, dtype=torch.int64)
    labels[:, :, 4:] = 1
    labels[:, 0, 0] = IGNORE_INDEX
    # two proposals covering the left / right halves exactly
    mask_logits = torch.full((1, 2, 8, 8), -8.0)
    mask_logits[0, 0, :, :4] = 8.0
    mask_logits[0, 1, :, 4:] = 8.0
    right = torch.tensor([[[9.0, 0.0, 0.0], [0.0, 9.0, 0.0]]])  # K = 2 + void
    wrong = right.flip(-1)  # both proposals called "void"/the other class
    right.requires_grad_(True)
    good = assembled_map_loss(mask_logits, right, labels)
    bad = assembled_map_loss(mask_logits, wrong, labels)
    assert good["loss"] < bad["loss"]
    good["loss"].backward()
    assert torch.isfinite(right.grad).all() and right.grad.abs().sum() > 0


def test_assembled_map_loss_rejects_out_of_range_labels():
    mask_logits, class_logits, labels = assembled_case(8)
    labels[0, 0, 0] = 3  # == K: the void channel is not a valid label
    with pytest.raises(ValueError, match="\\[3\\]"):
        assembled_map_loss(mask_logits, class_logits, labels)
    labels[0, 0, 0] = 255  # a stray file-level ignore value is not silently ignored
    with pytest.raises(ValueError, match="255"):
        assembled_map_loss(mask_logits, class_logits, labels)
    labels[labels == IGNORE_INDEX] = 255  # a caller with 255-ignore maps says so
    out = assembled_map_loss(mask_logits, class_logits, labels, ignore_index=255)
    reference = assembled_map_loss(
        mask_logits, class_logits, torch.where(labels == 255, IGNORE_INDEX, labels)
    )
    torch.testing.assert_close(out["loss"], reference["loss"])
