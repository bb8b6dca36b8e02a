"""The inference fast path (Segmenter.optimize / fast=True) gives the normal path's results."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from onepass_ovs import Segmenter
from onepass_ovs.images import prepare, to_tensor

TINY = ["deop-tiny", "clip-tiny", "sed-tiny", "gkc-tiny"]
VOCAB = ["red circle", "blue square, blue box", "green grass", "background"]
KW = {"size": 64, "sliding_window": 96}


def _image(h, w, seed):
    return (np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8)


IMAGES = [_image(48, 64, 1), _image(64, 200, 2)]  # one pass, and sliding windows


@pytest.fixture(scope="module", params=TINY)
def pair(request):
    normal = Segmenter.from_config(request.param, device="cpu", seed=0)
    fast = Segmenter(Segmenter.from_config(request.param, device="cpu", seed=0).model, fast=True)
    for a, b in zip(normal.model.state_dict().values(), fast.model.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    return normal, fast


def test_cpu_fast_path_matches_the_normal_path(pair):
    normal, fast = pair
    assert fast.fast_path is not None and fast.fast_path.channels_last
    assert fast.fast_path.autocast is None  # "auto": no autocast on a CPU
    convs = [m.weight for m in fast.model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    assert any(not w.is_contiguous() for w in convs)  # really re-laid out
    for want, got in zip(normal.segment(IMAGES, VOCAB, **KW), fast.segment(IMAGES, VOCAB, **KW), strict=True):
        np.testing.assert_allclose(got.probs, want.probs, rtol=0, atol=1e-4)
        assert (got.label_map == want.label_map).mean() >= 0.999
    # the encode-once path goes through the fast path too
    emb = fast.encode(IMAGES, **KW)
    for want, got in zip(normal.segment(IMAGES, VOCAB, **KW), fast.segment(emb, VOCAB), strict=True):
        np.testing.assert_allclose(got.probs, want.probs, rtol=0, atol=1e-4)


def test_predict_labels_equals_segment_at_the_working_size(pair):
    normal, fast = pair
    image = _image(64, 96, 5)  # already the working size: no resize, no padding
    canvas, geometry = prepare(to_tensor(image)[0], normal.config.preprocess, 64)
    assert geometry.original == geometry.resized == geometry.padded == (64, 96)
    want = normal.segment(image, VOCAB, size=64).label_map
    for seg in (normal, fast):
        labels = seg.predict_labels(torch.stack([canvas, canvas]), VOCAB)
        assert labels.shape == (2, 64, 96) and labels.dtype == torch.int64
        assert (labels[0].numpy() == want).mean() >= 0.999
        assert torch.equal(labels[0], labels[1])
    text = normal.encode_text(VOCAB)
    assert torch.equal(normal.predict_labels(canvas[None], text), normal.predict_labels(canvas[None], VOCAB))


def test_bf16_autocast_keeps_the_demo_segmentation(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    scene = Path(__file__).parent.parent / "examples" / "shapes_scene.png"
    from onepass_ovs.toy import scenes

    names = list(scenes.CLASS_NAMES)
    normal = Segmenter.from_pretrained("demo", device="cpu")
    fast = Segmenter.from_pretrained("demo", device="cpu").optimize(autocast="bf16")
    assert fast.fast_path.autocast == torch.bfloat16
    want, got = normal.segment(scene, names), fast.segment(scene, names)
    assert got.probs.dtype == np.float32
    # bf16 moves probabilities by ~1e-2: labels may flip only where the top two classes
    # were that close (the weak demo hesitates on ~8% of pixels); clear pixels never flip
    assert np.abs(got.probs - want.probs).max() < 0.05
    top2 = np.sort(want.probs, 0)[-2:]
    clear = top2[1] - top2[0] > 0.02
    assert clear.mean() > 0.8
    np.testing.assert_array_equal(got.label_map[clear], want.label_map[clear])
    undone = fast.optimize(autocast=None, channels_last=False)
    assert undone.fast_path is None
    np.testing.assert_allclose(undone.segment(scene, names).probs, want.probs, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="autocast"):
        normal.optimize(autocast="int8")


def test_compiled_image_pass_gives_the_same_scores():
    normal = Segmenter.from_config("clip-tiny", device="cpu", seed=0)
    compiled = Segmenter.from_config("clip-tiny", device="cpu", seed=0).optimize(
        compile="eager", channels_last=False
    )
    assert compiled.fast_path.compile_backend == "eager"
    want = normal.segment(IMAGES[0], VOCAB, size=64)
    got = compiled.segment(IMAGES[0], VOCAB, size=64)
    np.testing.assert_allclose(got.probs, want.probs, rtol=0, atol=1e-5)
