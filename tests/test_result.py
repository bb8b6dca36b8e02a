"""SegmentationResult: fast label maps equal the full argmax; overlays, legend, colours."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from onepass_ovs.images import Geometry
from onepass_ovs.result import SegmentationResult, class_colours, upsample_scores


def _random_case(gen: torch.Generator, trial: int):
    k = int(torch.randint(3, 400, (1,), generator=gen))
    h, w = (int(v) for v in torch.randint(1, 24, (2,), generator=gen))
    out_h, out_w = (int(v) for v in torch.randint(1, 150, (2,), generator=gen))
    padded = (h * 4, w * 4)
    resized = padded if trial % 2 else (max(1, h * 4 - 3), max(1, w * 4 - 2))
    geometry = Geometry((out_h, out_w), resized, padded)
    sharpness = float(torch.rand(1, generator=gen)) * 12
    scores = (torch.randn(k, h, w, generator=gen) * sharpness).softmax(0)
    if trial % 3 == 0:
        scores = (scores * 8).round() / 8  # many exact ties
    return scores, geometry


@pytest.mark.parametrize("threshold", [None, 0.3])
def test_label_map_equals_full_argmax_on_random_scores(threshold):
    """The pruned label map is bit-identical to upsampling every class (the slow path)."""
    gen = torch.Generator().manual_seed(0)
    for trial in range(30):
        scores, geometry = _random_case(gen, trial)
        k = scores.shape[0]
        result = SegmentationResult(scores, [f"c{i}" for i in range(k)], geometry, threshold)
        full = result._label_rows(0, geometry.original[0], None)  # every class, no pruning
        np.testing.assert_array_equal(result.label_map, full, err_msg=f"trial {trial}")


@pytest.mark.parametrize("prune_bytes", [None, 4096])
def test_label_map_exact_on_a_photo_geometry_with_smooth_flat_scores(prune_bytes, monkeypatch):
    """Stride-4 scores of a padded canvas, upsampled 3.75x: long affine pieces, many
    near-equal classes (the case the corner bounds prune), unknown threshold on; also with
    a tiny memory bound (classes in many chunks, two passes)."""
    if prune_bytes is not None:
        monkeypatch.setattr("onepass_ovs.result._PRUNE_BYTES", prune_bytes)
    gen = torch.Generator().manual_seed(3)
    k, h, w = 400, 16, 24
    logits = torch.randn(k, h // 4, w // 4, generator=gen)
    logits = torch.nn.functional.interpolate(logits[None], size=(h, w), mode="bilinear")[0]
    scores = (logits * 3).softmax(0)
    geometry = Geometry((240, 320), (64, 86), (64, 96))
    result = SegmentationResult(scores, [f"c{i}" for i in range(k)], geometry, 0.01)
    np.testing.assert_array_equal(result.label_map, result._label_rows(0, 240, None))
    assert len(np.unique(result.label_map)) > 5
    scores[3, 5, 7] = float("nan")  # non-finite scores: the plain argmax decides
    odd = SegmentationResult(scores, [f"c{i}" for i in range(k)], geometry)
    np.testing.assert_array_equal(odd.label_map, odd._label_rows(0, 240, None))


def test_label_map_matches_interpolate_reference():
    """Independent reference: F.interpolate + argmax, on scores with clear winners."""
    gen = torch.Generator().manual_seed(1)
    k, h, w = 300, 12, 17
    winner = torch.randint(0, k, (h, w), generator=gen)
    scores = torch.rand(k, h, w, generator=gen) * 0.01
    scores.scatter_(0, winner[None], 1.0)
    geometry = Geometry((101, 133), (45, 66), (48, 68))
    result = SegmentationResult(scores, [f"c{i}" for i in range(k)], geometry)
    reference = upsample_scores(scores, geometry).argmax(0).numpy()
    top2 = upsample_scores(scores, geometry).topk(2, dim=0).values
    clear = (top2[0] - top2[1]).numpy() > 1e-4  # exclude float near-ties between paths
    assert clear.mean() > 0.9
    np.testing.assert_array_equal(result.label_map[clear], reference[clear])
    np.testing.assert_array_equal(result.probs.argmax(0), result.label_map)


def test_large_vocabulary_upsamples_only_competing_classes():
    """With peaked scores, each band upsamples a few classes, not all 3000."""
    gen = torch.Generator().manual_seed(2)
    k, h, w = 3000, 16, 20
    winner = torch.randint(0, 5, (h, w), generator=gen) * 7
    scores = torch.rand(k, h, w, generator=gen) * 0.001
    scores.scatter_(0, winner[None], 1.0)
    result = SegmentationResult(
        scores, [f"c{i}" for i in range(k)], Geometry((240, 300), (64, 80), (64, 80))
    )
    bands = list(result._candidate_bands())
    assert sum(bottom - top for top, bottom, _ in bands) == 240
    assert max(len(ids) for _, _, ids in bands) <= 5
    np.testing.assert_array_equal(result.label_map, result._label_rows(0, 240, None))


# -- overlays and colours -------------------------------------------------------------------


def _three_regions(classes, unknown_label=-1):
    """Top half: classes[0]; bottom-left: classes[1]; bottom-right: classes[2]."""
    scores = torch.full((3, 4, 4), 0.01)
    scores[0, :2] = 1
    scores[1, 2:, :2] = 1
    scores[2, 2:, 2:] = 1
    geometry = Geometry((40, 40), (16, 16), (16, 16))
    return SegmentationResult(scores, classes, geometry, unknown_label=unknown_label)


GREY = np.full((40, 40, 3), 120, np.uint8)


def test_background_is_left_unpainted():
    literal = _three_regions(["cat", "background", "dog"])
    named = _three_regions(["cat", "sky, wall", "dog"], unknown_label=1)  # background="sky"
    none = _three_regions(["cat", "sky, wall", "dog"])
    for result, background_painted in ((literal, False), (named, False), (none, True)):
        picture = np.asarray(result.overlay(GREY, alpha=0.6, legend=False))
        region = result.label_map == 1
        assert region.any()
        unchanged = (picture[region] == GREY[region]).all()
        assert unchanged != background_painted
        assert not (picture[result.label_map == 0] == GREY[0, 0]).all()  # others painted
    faint = np.asarray(literal.overlay(GREY, alpha=0.6, legend=False, background_alpha=0.2))
    delta = np.abs(faint.astype(int) - GREY.astype(int))
    region = literal.label_map == 1
    assert 0 < delta[region].max() < np.abs(
        np.asarray(literal.overlay(GREY, alpha=0.6, legend=False)).astype(int) - 120
    )[literal.label_map == 0].max()


def test_colour_follows_the_name_not_the_index():
    first = _three_regions(["cat", "dog", "tv, television"])
    second = _three_regions(["tv, television", "cat", "dog"])  # same names, other order
    colours_first = {name: tuple(c) for name, c in zip(first.classes, first.colours, strict=True)}
    colours_second = {name: tuple(c) for name, c in zip(second.classes, second.colours, strict=True)}
    assert colours_first == colours_second
    # the painted pixels agree too: "cat" is top in `first`, bottom-left in `second`
    a = np.asarray(first.overlay(GREY, alpha=1.0, legend=False))
    b = np.asarray(second.overlay(GREY, alpha=1.0, legend=False))
    assert tuple(a[0, 0]) == colours_first["cat"] == tuple(b[39, 0])
    # and the label PNG's palette uses the same colours
    table = np.asarray(second.to_pil().getpalette()[:9]).reshape(3, 3)
    assert [tuple(t) for t in table] == [colours_first[n] for n in second.classes]
    # distinct names in one vocabulary get distinct colours; black stays "unknown"
    many = class_colours([f"class {i}" for i in range(40)])
    assert len({tuple(c) for c in many}) == 40 and many.max(1).min() > 100


def test_overlay_legend_lists_present_classes_with_their_colours():
    result = _three_regions(["cat", "background", "dog"])
    picture = np.asarray(result.overlay(GREY, alpha=0.5))
    assert picture.shape[0] >= 40 and picture.shape[1] > 40  # panel to the right
    np.testing.assert_array_equal(
        picture[:40, :40], np.asarray(result.overlay(GREY, alpha=0.5, legend=False))
    )
    panel = picture[:, 40:]
    names = [name for name, _, _ in result.legend_entries()]
    assert names == ["cat", "background", "dog"]  # largest first, only present classes
    for name in ("cat", "dog"):
        colour = result.colours[result.classes.index(name)]
        assert ((panel == colour).all(-1)).sum() >= 100  # a filled swatch
    # each entry row has text (dark pixels) right of its swatch
    dark = (panel.max(-1) < 80)
    rows_with_text = {int(y) // 16 for y in np.nonzero(dark.any(1))[0]}
    assert {0, 1, 2} <= rows_with_text
    # absent classes are not listed
    two = _three_regions(["cat", "dog", "bird"])
    two.label_map[two.label_map == 2] = 0
    assert [n for n, _, _ in two.legend_entries()] == ["cat", "dog"]
