"""Every registered preset through the same checks (timm-style): a new preset gets them free.

Full-size presets (ViT-B/16, ConvNeXt-B, RN50, ...) are built and run at a small input so
the suite stays fast; the checks are the same.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from onepass_ovs import Segmenter, list_models
from onepass_ovs.models.interface import SegmentationModel
from onepass_ovs.models.registry import config_from_dict, families, list_presets, preset_config
from onepass_ovs.sliding import window_layout

PRESETS = list_presets()
VOCAB = ["red circle", "blue square, blue box", "background"]


def _small(config):
    """The preset with a small working size (the architecture is unchanged)."""
    pre = config.preprocess
    pre.short_side = 64
    pre.max_long_side = 128
    pre.window = 128
    config.text.templates = "single"  # the 80-template ensemble only costs text passes here
    return config


@pytest.fixture(scope="module", params=PRESETS)
def built(request):
    torch.manual_seed(0)
    seg = Segmenter.from_config(_small(preset_config(request.param)), device="cpu")
    return request.param, seg


def _image(h=48, w=64, seed=0):
    return (np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8)


def test_every_family_has_a_preset_and_every_preset_is_listed():
    names = set(PRESETS)
    assert names <= set(list_models())
    for family in families():
        assert any(preset_config(p).family == family for p in PRESETS), family


def test_build_implements_the_interface_and_forward(built):
    name, seg = built
    assert isinstance(seg.model, SegmentationModel)
    assert seg.config.name == name
    res = seg.segment(_image(), VOCAB)
    assert res.label_map.shape == (48, 64)
    assert res.label_map.dtype == np.int32
    assert 0 <= res.label_map.min() and res.label_map.max() < len(VOCAB)
    probs = res.probs
    np.testing.assert_allclose(probs.sum(0), 1.0, atol=1e-4)


def test_encode_then_decode_equals_predict(built):
    _, seg = built
    images = torch.rand(2, 3, 64, 64)
    text = seg.encode_text(VOCAB)
    with torch.no_grad():
        direct = seg.model.predict_scores(images, text, None)
        split = seg.model.decode_scores(seg.model.encode_image(images, None), text)
    direct = direct if isinstance(direct, torch.Tensor) else direct.dense()
    split = split if isinstance(split, torch.Tensor) else split.dense()
    torch.testing.assert_close(direct, split, atol=0, rtol=0)
    assert direct.shape[:2] == (2, len(VOCAB)) and (direct >= 0).all()


def test_backward_reaches_trainable_parameters(built):
    name, seg = built
    model = seg.model
    text = model.text(VOCAB).detach()
    model.train()
    try:
        scores = model.predict_scores(torch.rand(1, 3, 64, 64), text, None)
        scores = scores if isinstance(scores, torch.Tensor) else scores.dense()
        scores.sum().backward()
        grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
        assert grads, f"{name}: no parameter received a gradient"
        assert any(g.abs().sum() > 0 for g in grads)
    finally:
        model.zero_grad(set_to_none=True)
        model.eval()


def test_save_load_round_trip_is_bit_exact(built, tmp_path):
    # runs after the backward test: train() must not have changed any state (eval again)
    _, seg = built
    seg.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    loaded = Segmenter.from_pretrained(tmp_path, device="cpu")
    a, b = seg.model.state_dict(), loaded.model.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert loaded.config.to_dict() == seg.config.to_dict()
    image = _image(seed=1)
    np.testing.assert_array_equal(
        seg.segment(image, VOCAB).label_map, loaded.segment(image, VOCAB).label_map
    )


def test_config_json_round_trips(built):
    _, seg = built
    data = json.loads(json.dumps(seg.config.to_dict()))
    assert config_from_dict(data).to_dict() == seg.config.to_dict()


def test_batch_equals_single(built):
    _, seg = built
    images = [_image(seed=2), _image(40, 56, seed=3)]
    batch = seg.segment(images, VOCAB, batch_size=2)
    for image, res in zip(images, batch, strict=True):
        single = seg.segment(image, VOCAB)
        np.testing.assert_allclose(res.probs, single.probs, atol=1e-5)
        _assert_same_labels_except_ties(res, single)


def test_sliding_window_equals_one_pass_when_the_image_fits(built):
    _, seg = built
    image = _image(seed=4)
    one = seg.segment(image, VOCAB, sliding_window=False)
    windows = window_layout(128, seg.config.preprocess)
    assert not windows.needed((64, 96))
    slid = seg.segment(image, VOCAB, sliding_window=128)
    np.testing.assert_allclose(slid.probs, one.probs, atol=1e-5)
    _assert_same_labels_except_ties(slid, one)


def _assert_same_labels_except_ties(a, b, margin=1e-4):
    """Label maps agree wherever the best class leads the second by more than ``margin``
    (random weights make near-ties, where float rounding may pick either)."""
    top2 = np.sort(b.probs, axis=0)[-2:]
    clear = (top2[1] - top2[0]) > margin
    assert clear.any()
    np.testing.assert_array_equal(a.label_map[clear], b.label_map[clear])
