"""Images of any size: resize policy, sliding windows and their blending, banded upsampling."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from onepass_ovs import Segmenter
from onepass_ovs.config import ModelConfig, PreprocessConfig
from onepass_ovs.images import Geometry, blend_ramp, prepare, window_boxes, window_starts
from onepass_ovs.models.towers import TINY_CLIP_CFG
from onepass_ovs.models.training_free import TrainingFreeCLIP, clip_model_config
from onepass_ovs.result import SegmentationResult, upsample_scores
from onepass_ovs.sliding import slide, window_layout

VOCAB = ["cat", "sofa, couch", "background"]


class PositionModel(nn.Module):
    """A stand-in family whose scores depend only on the pixels under each output cell
    (class k = channel k averaged over 4 x 4 blocks), so any correct window placement
    reproduces the one-pass scores exactly."""

    def __init__(self, window=64, blend="linear"):
        super().__init__()
        self.config = ModelConfig(
            family="stand-in",
            preprocess=PreprocessConfig(short_side=64, max_long_side=1024, pad_multiple=16,
                                        window=window, window_blend=blend)
        )
        self.calls: list[tuple[int, ...]] = []

    def text(self, vocabulary):
        return torch.eye(len(vocabulary), 3)

    def predict_scores(self, images, text, image_sizes=None):
        self.calls.append(tuple(images.shape))
        return F.avg_pool2d(images, 4)[:, : text.shape[0]] + 0.01


def _image(h, w, seed=0):
    return (np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8)


def test_window_layout_covers_the_canvas_with_equal_windows():
    assert window_starts(64, 64, 48) == [0]
    assert window_starts(200, 64, 48) == [0, 48, 96, 136]  # last window flush with the end
    boxes = window_boxes((96, 200), 64, 48)
    assert {(y1 - y0, x1 - x0) for y0, x0, y1, x1 in boxes} == {(64, 64)}
    covered = np.zeros((96, 200), bool)
    for y0, x0, y1, x1 in boxes:
        covered[y0:y1, x0:x1] = True
    assert covered.all()
    assert window_boxes((32, 200), 64, 48)[0] == (0, 0, 32, 64)  # clipped to a short side


def test_linear_ramps_cross_fade_to_one():
    ramp = blend_ramp(16, 8, single=False)
    np.testing.assert_allclose(ramp[:8].numpy(), (np.arange(8) + 0.5) / 8)
    assert (ramp[8:] <= 1).all() and ramp[7] == ramp[8] == pytest.approx(7.5 / 8)
    # two windows 8 cells apart: their ramps sum to 1 over the overlap
    np.testing.assert_allclose((ramp[8:] + ramp[:8]).numpy(), 1.0, atol=1e-6)
    assert (blend_ramp(16, 8, single=True) == 1).all()
    assert (blend_ramp(16, 8, single=False, mode="mean") == 1).all()
    with pytest.raises(ValueError, match="blending"):
        blend_ramp(4, 2, single=False, mode="gaussian")


def test_blending_on_a_constructed_case():
    """Windows returning constants 1 and 2: the overlap is a linear cross-fade."""
    seg = Segmenter(PositionModel(window=64), device="cpu")
    canvas = torch.zeros(3, 32, 96)
    geometry = Geometry((32, 96), (32, 96), (32, 96))
    windows = window_layout((64, 32), seg.config.preprocess)
    assert window_boxes((32, 96), 64, 32) == [(0, 0, 32, 64), (0, 32, 32, 96)]

    def constant_per_window(batch, sizes, boxes):
        values = torch.tensor([1.0 + x0 // 32 for _, x0, _, _ in boxes])
        return values.view(-1, 1, 1, 1).expand(len(boxes), 1, 8, 16)

    out = slide(constant_per_window, canvas, geometry, windows, 1, seg.config.preprocess.pad_multiple)
    assert out.shape == (1, 8, 24)  # output stride 4 on the whole canvas
    ramp = 1 + (np.arange(8) + 0.5) / 8
    expected = np.concatenate([np.ones(8), ramp, np.full(8, 2.0)])
    np.testing.assert_allclose(out[0, 3].numpy(), expected, atol=1e-6)
    assert (out[0] == out[0, :1]).all()  # a single window along y: no vertical ramp

    mean = Segmenter(PositionModel(window=64, blend="mean"), device="cpu")
    out = slide(constant_per_window, canvas, geometry, window_layout((64, 32), mean.config.preprocess), 2,
                mean.config.preprocess.pad_multiple)
    np.testing.assert_allclose(out[0, 0, 8:16].numpy(), 1.5)


@pytest.mark.parametrize("blend", ["linear", "mean"])
def test_sliding_places_windows_exactly(blend):
    model = PositionModel(window=64, blend=blend)
    seg = Segmenter(model, device="cpu")
    image = _image(150, 230)
    one_pass = seg.segment(image, VOCAB, size="original", sliding_window=False)
    assert model.calls == [(1, 3, 160, 240)]
    model.calls.clear()
    slid = seg.segment(image, VOCAB, size="original", batch_size=3)
    assert model.calls and all(shape[1:] == (3, 64, 64) for shape in model.calls)
    assert sum(shape[0] for shape in model.calls) == len(window_boxes((160, 240), 64, 48))
    assert slid.label_map.shape == (150, 230)
    np.testing.assert_allclose(slid.probs, one_pass.probs, atol=1e-5)
    # blending rounds at 1e-7; only exact ties between classes may flip
    assert (slid.label_map == one_pass.label_map).mean() > 0.999


def _tiny_clip_segmenter():
    torch.manual_seed(0)
    cfg = clip_model_config(copy.deepcopy(TINY_CLIP_CFG), templates="single")
    cfg.preprocess.short_side = 64
    cfg.preprocess.window = 64
    return Segmenter(TrainingFreeCLIP(cfg), device="cpu")


@pytest.mark.parametrize("family", ["deop", "clip"])
def test_sliding_equals_single_pass_when_the_image_fits(family, tiny_segmenter):
    seg = tiny_segmenter if family == "deop" else _tiny_clip_segmenter()
    image = torch.from_numpy(_image(45, 61)).permute(2, 0, 1).float() / 255
    canvas, geometry = prepare(image, seg.config.preprocess)
    text = seg.encode_text(VOCAB)
    windows = window_layout(max(geometry.padded), seg.config.preprocess)
    assert not windows.needed(geometry.padded)
    slid = slide(lambda b, sizes, boxes: seg.predict_scores(b, text, sizes),
                 canvas, geometry, windows, 2, seg.config.preprocess.pad_multiple)
    single = seg.predict_scores(canvas[None], text, [geometry.resized])
    single = single[0] if isinstance(single, torch.Tensor) else single.dense()[0]
    torch.testing.assert_close(slid, single, atol=0, rtol=0)
    a = seg.segment(image, VOCAB, sliding_window=512)
    b = seg.segment(image, VOCAB, sliding_window=False)
    np.testing.assert_array_equal(a.probs, b.probs)


@pytest.mark.parametrize("family", ["deop", "clip"])
def test_large_image_slides_and_returns_a_full_size_map(family, tiny_segmenter, monkeypatch):
    seg = tiny_segmenter if family == "deop" else _tiny_clip_segmenter()
    seen = []
    original = seg.model.predict_scores

    def spy(images, text, sizes):
        seen.append((tuple(images.shape[-2:]), list(sizes)))
        return original(images, text, sizes)

    monkeypatch.setattr(seg.model, "predict_scores", spy)
    image = _image(200, 130)
    res = seg.segment(image, VOCAB, size="original", sliding_window=(96, 64), batch_size=8)
    assert res.label_map.shape == (200, 130)
    assert {shape for shape, _ in seen} == {(96, 96)}
    # each window knows its valid (unpadded) part; the last ones reach into the padding
    _, geometry = prepare(torch.zeros(3, 200, 130), seg.config.preprocess, "original")
    windows = window_layout((96, 64), seg.config.preprocess)
    boxes = window_boxes(geometry.padded, windows.window, windows.stride)
    assert len(boxes) == 6
    expected = [(min(200 - y0, 96), min(130 - x0, 96)) for y0, x0, _, _ in boxes]
    assert [s for _, batch in seen for s in batch] == expected
    assert expected[-1] != (64, 64)
    np.testing.assert_allclose(res.probs.sum(0), 1.0, atol=1e-5)


def test_default_window_policy(tiny_segmenter):
    pre = tiny_segmenter.config.preprocess
    assert (pre.window, pre.window_stride, pre.window_blend) == (1024, 0, "linear")
    windows = window_layout(None, tiny_segmenter.config.preprocess)
    assert (windows.window, windows.stride) == (1024, 768)
    assert window_layout(100, tiny_segmenter.config.preprocess).window == 96  # rounded to the pad multiple (32)
    assert window_layout(False, tiny_segmenter.config.preprocess) is None
    clip_pre = clip_model_config(copy.deepcopy(TINY_CLIP_CFG)).preprocess
    assert (clip_pre.short_side, clip_pre.window, clip_pre.pad_multiple) == (448, 448, 16)
    with pytest.raises(TypeError, match="sliding_window"):
        window_layout("big", tiny_segmenter.config.preprocess)
    with pytest.raises(ValueError, match="positive"):
        window_layout(-5, tiny_segmenter.config.preprocess)


def test_size_original_keeps_the_working_size(tiny_segmenter):
    canvas, geometry = prepare(torch.zeros(3, 45, 61), tiny_segmenter.config.preprocess, "original")
    assert geometry.resized == (45, 61) and geometry.padded == (64, 64)
    with pytest.raises(ValueError, match="original"):
        prepare(torch.zeros(3, 4, 4), tiny_segmenter.config.preprocess, "huge")


def test_banded_upsampling_matches_interpolate(monkeypatch):
    import onepass_ovs.result as result_module

    g = torch.Generator().manual_seed(0)
    geometry = Geometry(original=(45, 61), resized=(64, 87), padded=(64, 96))
    scores = torch.rand(5, 16, 24, generator=g)
    res = SegmentationResult(scores, [f"c{i}" for i in range(5)], geometry, unknown_threshold=0.3)
    up = upsample_scores(scores, geometry)
    expected = (up + 1e-8) / (up.sum(0, keepdim=True) + 5e-8)
    np.testing.assert_allclose(res.probs, expected.numpy(), atol=1e-5)
    # upscaling too (a small image worked at a larger size)
    small = Geometry(original=(300, 500), resized=(64, 107), padded=(64, 112))
    big = SegmentationResult(scores[:, :, :7].repeat(1, 1, 4), res.classes, small)
    ref = upsample_scores(scores[:, :, :7].repeat(1, 1, 4), small)
    assert (big.label_map == ref.argmax(0).numpy()).mean() > 0.999
    monkeypatch.setattr(result_module, "_BAND_BYTES", 1)  # one row at a time
    banded = SegmentationResult(scores, res.classes, geometry, unknown_threshold=0.3)
    np.testing.assert_array_equal(banded.label_map, res.label_map)
    np.testing.assert_array_equal(banded.probs, res.probs)
