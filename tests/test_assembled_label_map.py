"""Label maps of assembled scores (DeOP, GKC) with large vocabularies: exactly the argmax of
the fully materialised scores, ties to the lowest class index, whatever path makes them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import onepass_ovs.result as result_module
from onepass_ovs.images import Geometry
from onepass_ovs.models.assembly import AssembledScores
from onepass_ovs.result import SegmentationResult

# canvas (padded) = 4 x the mask grid; the output is the original image's size
GEOMETRIES = {
    "128px": ((32, 32), Geometry((128, 128), (128, 128), (128, 128))),
    "odd": ((12, 10), Geometry((101, 77), (48, 37), (48, 40))),
    "smaller": ((12, 10), Geometry((30, 23), (48, 37), (48, 40))),  # output below the canvas
}


def _case(geometry_name: str, k: int, seed: int, n: int = 16, sharpness: float = 4.0):
    """Mask logits (1, N, h, w) and class probabilities (1, N, K): smooth masks, and class
    probabilities with many comparable classes (the hard case for pruning)."""
    (h, w), geometry = GEOMETRIES[geometry_name]
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.randn(1, n, max(1, h // 4), max(1, w // 4), generator=gen) * 8
    mask_logits = F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)
    mask_logits = mask_logits + torch.randn(1, n, h, w, generator=gen)
    probs = (torch.randn(1, n, k + 1, generator=gen) * sharpness).softmax(-1)[..., :-1]
    return mask_logits, probs.contiguous(), geometry


def _mask_values(mask_logits, geometry):
    """(N, H0, W0) sigmoid mask maps at the output size, by F.interpolate (independent)."""
    h1, w1 = geometry.resized
    up = F.interpolate(mask_logits.float(), size=geometry.padded, mode="bilinear",
                       align_corners=False).sigmoid()[..., :h1, :w1]
    if (h1, w1) != geometry.original:
        up = F.interpolate(up, size=geometry.original, mode="bilinear", align_corners=False)
    return up[0]


def _dense_reference(result: SegmentationResult, scores: AssembledScores, check_masks=True):
    """(label map, (K, H0, W0) scores): argmax over classes (torch: the first maximum) of
    the scores
    sum_n p_n[k] * m_n(x), the products added in order n = 0, 1, ...; m is the result's own
    resizing of the mask maps (checked against F.interpolate)."""
    h0 = result.size[0]
    m = result._upsampler.rows(scores.mask_maps(), 0, h0)  # (N, H0, W0), all rows at once
    if check_masks:
        torch.testing.assert_close(m, _mask_values(scores.mask_logits, result.geometry),
                                   atol=2e-6, rtol=1e-5)
    probs = scores.probs[0]
    full = probs[0][:, None, None] * m[0]
    for n in range(1, probs.shape[0]):
        full = full + probs[n][:, None, None] * m[n]
    return full.argmax(0).numpy(), full


def _result(mask_logits, probs, geometry, **kwargs):
    scores = AssembledScores(mask_logits, None, geometry.padded, probs=probs)
    k = probs.shape[-1]
    return SegmentationResult(scores, [f"c{i}" for i in range(k)], geometry, **kwargs), scores


@pytest.mark.parametrize("geometry_name", ["128px", "odd", "smaller"])
@pytest.mark.parametrize("k", [3, 40, 3000])
def test_label_map_is_the_argmax_of_the_dense_scores(geometry_name, k):
    mask_logits, probs, geometry = _case(geometry_name, k, seed=k)
    result, scores = _result(mask_logits, probs, geometry)
    reference, _ = _dense_reference(result, scores)
    np.testing.assert_array_equal(result.label_map, reference)
    assert len(np.unique(reference)) >= (2 if k < 10 else 3)  # not a trivial map


@pytest.mark.parametrize("geometry_name", ["128px", "odd"])
def test_exact_ties_go_to_the_lowest_index_and_near_ties_are_decided_exactly(geometry_name):
    """Winning classes get exact copies at lower and higher indices (ties: the lowest index
    wins), and copies one float step larger or smaller in one proposal (near-ties that only
    exact float scores decide)."""
    k = 600
    mask_logits, probs, geometry = _case(geometry_name, k, seed=7)
    result, scores = _result(mask_logits, probs, geometry)
    reference, _ = _dense_reference(result, scores)
    winners = [int(c) for c in np.unique(reference)]
    assert len(winners) >= 3
    free = sorted(set(range(k)) - set(winners))
    for c in winners:
        below = [j for j in free if j < c][-1:]
        above = [j for j in free if j > c][:3]
        for j in below + above[:1]:  # exact copies, one at a lower and one at a higher index
            probs[0, :, j] = probs[0, :, c]
        n = int(torch.argmax(probs[0, :, c]))
        for j, direction in zip(above[1:], (float("inf"), 0.0), strict=False):
            probs[0, :, j] = probs[0, :, c]  # one float step up / down in one proposal
            probs[0, n, j] = torch.nextafter(probs[0, n, c], torch.tensor(direction))
        free = [j for j in free if j not in below + above]
    result, scores = _result(mask_logits, probs, geometry)
    reference, full = _dense_reference(result, scores)
    np.testing.assert_array_equal(result.label_map, reference)
    # the ties are real: some pixels have two classes with bit-equal best scores
    top2 = full.topk(2, dim=0).values
    assert bool((top2[0] == top2[1]).any())


@pytest.mark.parametrize("geometry_name", ["128px", "odd"])
def test_one_class_winning_everywhere(geometry_name):
    """Every tile is settled on the coarsest level (no pixel is scored)."""
    mask_logits, probs, geometry = _case(geometry_name, 500, seed=19)
    probs[0, :, 123] = 1.0
    result, scores = _result(mask_logits, probs, geometry)
    assert (result.label_map == 123).all()
    np.testing.assert_array_equal(result.label_map, _dense_reference(result, scores)[0])


def test_all_classes_equal_every_pixel_takes_the_first():
    mask_logits, probs, geometry = _case("odd", 500, seed=3)
    probs[:] = probs[..., :1]
    result, _ = _result(mask_logits, probs, geometry)
    assert (result.label_map == 0).all()


@pytest.mark.parametrize(
    "setting",
    [
        {"_ASSEMBLED_DENSE_CLASSES": 10**9},  # every class at every pixel
        {"_ASSEMBLED_MAX_PAIRS": 10},  # too many candidates: falls back to scoring densely
        {"_ASSEMBLED_BYTES": 4096},  # work arrays in many small chunks
        {"_ASSEMBLED_BAND_BYTES": 4096},  # output rows in many bands (32 rows each)
        {"_ASSEMBLED_TILES": (8, 4, 2)},
    ],
)
def test_every_path_gives_the_same_label_map(setting, monkeypatch):
    mask_logits, probs, geometry = _case("odd", 1000, seed=11)
    expected = _result(mask_logits, probs, geometry)[0].label_map
    for name, value in setting.items():
        monkeypatch.setattr(result_module, name, value)
    np.testing.assert_array_equal(_result(mask_logits, probs, geometry)[0].label_map, expected)


def test_large_vocabulary_never_scores_every_class_densely(monkeypatch):
    """3000 classes at 128 px: the pruned path alone makes the label map."""
    mask_logits, probs, geometry = _case("128px", 3000, seed=5)

    def forbidden(*args):
        raise AssertionError("scored every class at every pixel")

    reference, _ = _dense_reference(*_result(mask_logits, probs, geometry))
    monkeypatch.setattr(result_module, "_dense_assembled_argmax", forbidden)
    result, _ = _result(mask_logits, probs, geometry)
    np.testing.assert_array_equal(result.label_map, reference)


def test_unknown_threshold_uses_the_exact_best_score():
    mask_logits, probs, geometry = _case("odd", 800, seed=13, sharpness=2.0)
    plain, scores = _result(mask_logits, probs, geometry)
    reference, full = _dense_reference(plain, scores)
    m = plain._upsampler.rows(scores.mask_maps(), 0, geometry.original[0])
    total = torch.einsum("nrw,n->rw", m, probs[0].sum(1))
    best_prob = ((full.max(0).values + 1e-8) / (total + 800 * 1e-8)).numpy()
    threshold = float(np.median(best_prob))
    result, _ = _result(mask_logits, probs, geometry, unknown_threshold=threshold)
    np.testing.assert_array_equal(result.label_map == -1, best_prob < threshold)
    known = result.label_map != -1
    np.testing.assert_array_equal(result.label_map[known], reference[known])


def test_non_finite_mask_logits_follow_torch_argmax(monkeypatch):
    """A NaN mask value makes every class NaN there: torch.argmax picks the first NaN
    (class 0); classes in several chunks must agree."""
    monkeypatch.setattr(result_module, "_ASSEMBLED_BYTES", 8192)
    mask_logits, probs, geometry = _case("odd", 300, seed=17)
    mask_logits[0, 2, 3, 4] = float("nan")
    result, scores = _result(mask_logits, probs, geometry)
    reference, full = _dense_reference(result, scores, check_masks=False)  # NaN spreads
    assert bool(full.isnan().any())
    np.testing.assert_array_equal(result.label_map, reference)
