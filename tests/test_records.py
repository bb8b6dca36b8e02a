"""Per-segment scores, transformers-style records and supervision Detections."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from onepass_ovs import Segmenter
from onepass_ovs.images import Geometry
from onepass_ovs.result import SegmentationResult
from onepass_ovs.toy import scenes

VOCAB = list(scenes.CLASS_NAMES)
SCENE = Path(__file__).parent.parent / "examples" / "shapes_scene.png"


@pytest.fixture(scope="module")
def demo():
    # the shipped demo on a shapes scene: several classes present, varied confidence
    return Segmenter.from_pretrained("demo", device="cpu", local_files_only=True)


@pytest.fixture(scope="module")
def result(demo):
    return demo.segment(SCENE, VOCAB)


def _reference_scores(result):
    """Mean of the materialised probabilities over each class's labelled pixels."""
    probs = result.probs
    return {
        i: float(probs[i][result.label_map == i].mean())
        for i in np.unique(result.label_map) if i >= 0
    }


def test_segment_scores_are_mean_probabilities_over_the_segment(demo):
    fresh = demo.segment(SCENE, VOCAB)
    banded = fresh.segment_scores()  # before probs exist: the band-by-band path
    assert "probs" not in fresh.__dict__
    want = _reference_scores(fresh)
    assert banded.keys() == want.keys() and len(want) >= 2
    for i in want:
        assert banded[i] == pytest.approx(want[i], abs=1e-5)
        assert 1 / len(VOCAB) <= banded[i] <= 1.0
    assert fresh.segment_scores() == pytest.approx(want, abs=1e-6)  # the probs path


def test_hand_made_scores_give_known_segments():
    # two classes on a 2 x 4 canvas: left half class 0 with p = 0.75, right half class 1
    # with p = 0.6 and 0.9 (scores already normalised), no resizing
    scores = torch.tensor([
        [[3.0, 3.0, 0.4, 0.1], [3.0, 3.0, 0.4, 0.1]],
        [[1.0, 1.0, 0.6, 0.9], [1.0, 1.0, 0.6, 0.9]],
    ])
    scores[:, :, :2] /= 4.0
    geometry = Geometry(original=(2, 4), resized=(2, 4), padded=(2, 4))
    res = SegmentationResult(scores, ["a", "b"], geometry)
    segs = res.segments()
    assert [s["label"] for s in segs] == ["a", "b"]
    assert segs[0]["score"] == pytest.approx(0.75, abs=1e-6)
    assert segs[1]["score"] == pytest.approx(0.75, abs=1e-6)  # mean of 0.6 and 0.9
    assert segs[0]["area"] == 4 and segs[1]["area"] == 4
    np.testing.assert_array_equal(segs[1]["mask"], [[0, 0, 1, 1], [0, 0, 1, 1]])


def test_segments_and_records(result):
    segs = result.segments()
    present = sorted(i for i in np.unique(result.label_map) if i >= 0)
    assert [s["class_id"] for s in segs] == present
    union = np.zeros_like(result.label_map, dtype=int)
    for s in segs:
        assert s["label"] == VOCAB[s["class_id"]]
        np.testing.assert_array_equal(s["mask"], result.label_map == s["class_id"])
        assert s["area"] == s["mask"].sum()
        union += s["mask"]
    assert (union == 1).all()  # no unknowns here: the segments tile the image
    records = result.to_records()
    assert [set(r) for r in records] == [{"score", "label", "mask"}] * len(segs)
    for r, s in zip(records, segs, strict=True):
        assert r["mask"].mode == "L" and r["mask"].size == result.size[::-1]
        np.testing.assert_array_equal(np.asarray(r["mask"]) == 255, s["mask"])
        assert r["score"] == s["score"] and r["label"] == s["label"]


def test_unknown_pixels_belong_to_no_segment(demo):
    res = demo.segment(SCENE, VOCAB, unknown_threshold=0.5)
    assert (res.label_map == -1).any()
    covered = sum(s["mask"].astype(int) for s in res.segments())
    np.testing.assert_array_equal(covered == 0, res.label_map == -1)


def test_to_supervision(result):
    sv = pytest.importorskip("supervision")
    det = result.to_supervision()
    segs = result.segments()
    assert isinstance(det, sv.Detections) and len(det) == len(segs)
    np.testing.assert_array_equal(det.mask, np.stack([s["mask"] for s in segs]))
    np.testing.assert_array_equal(det.class_id, [s["class_id"] for s in segs])
    np.testing.assert_allclose(det.confidence, [s["score"] for s in segs], rtol=1e-6)
    assert list(det.data["class_name"]) == [s["label"] for s in segs]
    np.testing.assert_array_equal(det.xyxy, sv.mask_to_xyxy(det.mask))
    # supervision's own operations accept it
    assert len(det[det.confidence > 0]) == len(segs)
    assert np.all(det.area == [s["area"] for s in segs])


def test_supervision_example_writes_an_annotated_png(tmp_path, monkeypatch):
    pytest.importorskip("supervision")
    import runpy

    from PIL import Image

    out = tmp_path / "overlay.png"
    example = Path(__file__).parent.parent / "examples" / "supervision_overlay.py"
    monkeypatch.setattr("sys.argv", ["supervision_overlay.py", str(SCENE), "--out", str(out)])
    runpy.run_path(str(example), run_name="__main__")
    drawn = np.asarray(Image.open(out).convert("RGB"))
    plain = np.asarray(Image.open(SCENE).convert("RGB").resize(drawn.shape[1::-1], Image.NEAREST))
    assert drawn.shape == plain.shape and (drawn != plain).any(axis=-1).mean() > 0.01
