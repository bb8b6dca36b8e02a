"""The shipped ``demo`` model: loads offline, is small, and segments fresh shapes scenes."""

from __future__ import annotations

import numpy as np
import pytest

from onepass_ovs import Segmenter
from onepass_ovs.evaluation.metrics import ConfusionMatrix, seen_unseen
from onepass_ovs.hub import package_weights_dir
from onepass_ovs.toy import scenes

# Floors above chance (1/31 of the classes: ~3% mIoU) and below what the shipped demo
# measures on these 12 scenes (seen mIoU 10.4, background IoU 97.7; docs/shapes_world.md
# says why the demo is still weak), so the test checks that the demo works without being
# a noisy re-run of the benchmark. Raise them when a better demo ships.
SEEN_FLOOR = 6.0
BACKGROUND_FLOOR = 80.0


@pytest.fixture(scope="module")
def demo(monkeypatch_module):
    monkeypatch_module.setenv("HF_HUB_OFFLINE", "1")
    return Segmenter.from_pretrained("demo", device="cpu")


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def test_demo_is_shipped_small_and_safetensors_only():
    folder = package_weights_dir("demo")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    size_mb = sum(p.stat().st_size for p in folder.iterdir()) / 2**20
    assert size_mb <= 20.0


def test_demo_segments_fresh_scenes_well_above_chance(demo):
    names = list(scenes.CLASS_NAMES)
    matrix = ConfusionMatrix(len(names))
    batch = scenes.render_scenes(424242, 12, 128)  # a stream never used in the recipe
    results = demo.segment(list(batch.images), names, batch_size=6)
    for result, label in zip(results, batch.labels, strict=True):
        assert result.label_map.shape == label.shape
        matrix.update(result.label_map, label)
    metrics = matrix.compute()
    unseen_ids = [names.index(n) for n in scenes.UNSEEN_CLASSES]
    split = seen_unseen(metrics["per_class"], unseen_ids)
    assert metrics["per_class"][0] >= BACKGROUND_FLOOR  # background
    assert split["miou_seen"] >= SEEN_FLOOR


def test_demo_clip_is_usable_training_free():
    seg = Segmenter.from_pretrained("clip:demo", device="cpu")
    demo_config = Segmenter.from_pretrained("demo", device="cpu").config
    # the training-free model runs at the resolution its CLIP was trained for
    assert seg.config.preprocess.short_side == demo_config.preprocess.short_side
    image = scenes.render_scene(5, 128).image
    result = seg.segment(image, list(scenes.CLASS_NAMES))
    assert result.label_map.shape == (128, 128)
    assert np.isfinite(result.probs).all()


def test_demo_windows_suit_the_model(demo, monkeypatch):
    """The demo works at 128 px: large images at their own size are cut into windows a few
    times that size (not 1024 px windows, whose attention cost grows with the square of
    the tokens), and the label map still covers the whole image."""
    pre = demo.config.preprocess
    assert pre.window <= 2 * pre.short_side
    seen = []
    original = demo.model.predict_scores

    def spy(images, *args, **kwargs):
        seen.append(tuple(images.shape[-2:]))
        return original(images, *args, **kwargs)

    monkeypatch.setattr(demo.model, "predict_scores", spy)
    image = (np.random.default_rng(0).random((300, 420, 3)) * 255).astype(np.uint8)
    res = demo.segment(image, ["red circle", "background"], size="original")
    assert res.label_map.shape == (300, 420)
    assert seen and max(max(s) for s in seen) <= pre.window
