"""Segmenter.segment: inputs, vocabularies, batching, results."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from onepass_ovs import SegmentationResult

VOCAB = ["cat", "sofa, couch", "background"]


def test_single_image_result_contract(tiny_segmenter, rgb_image):
    res = tiny_segmenter.segment(rgb_image, VOCAB)
    assert isinstance(res, SegmentationResult)
    assert res.label_map.shape == (45, 61) and res.label_map.dtype == np.int32
    assert res.classes == VOCAB
    assert set(np.unique(res.label_map)) <= {0, 1, 2}
    probs = res.probs
    assert probs.shape == (3, 45, 61) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(0), 1.0, atol=1e-5)
    np.testing.assert_array_equal(probs.argmax(0), res.label_map)


def test_list_in_list_out_and_batch_equals_single(tiny_segmenter, rng):
    images = [(rng.random((64, 64, 3)) * 255).astype(np.uint8) for _ in range(3)]
    images.append((rng.random((40, 90, 3)) * 255).astype(np.uint8))
    batched = tiny_segmenter.segment(images, VOCAB, batch_size=4)
    assert isinstance(batched, list) and len(batched) == 4
    for img, res in zip(images, batched, strict=True):
        single = tiny_segmenter.segment(img, VOCAB, batch_size=1)
        np.testing.assert_allclose(res.probs, single.probs, atol=1e-5)
        np.testing.assert_array_equal(res.label_map, single.label_map)
    assert tiny_segmenter.segment([], VOCAB) == []


def test_text_encoded_once_for_a_list(tiny_segmenter, rgb_image, monkeypatch):
    calls = []
    original = tiny_segmenter.model.text.encode_names
    tiny_segmenter.model.text.clear_cache()

    def counting(names):
        calls.append(list(names))
        return original(names)

    monkeypatch.setattr(tiny_segmenter.model.text, "encode_names", counting)
    tiny_segmenter.segment([rgb_image] * 3, ["zebra", "giraffe"])
    tiny_segmenter.segment(rgb_image, ["zebra", "giraffe"])
    assert calls == [["giraffe", "zebra"]]


def test_big_vocabulary(tiny_segmenter, rgb_image):
    vocab = [f"class number {i}" for i in range(1200)]
    res = tiny_segmenter.segment(rgb_image, vocab)
    assert res.label_map.max() < 1200 and res.probs.shape[0] == 1200
    img = res.to_pil()
    assert img.mode in ("I;16", "I;16B", "I;16L", "I")
    np.testing.assert_array_equal(np.asarray(img).astype(np.int64), res.label_map)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P", "CMYK", "I;16", "LA", "I", "F"])
def test_pil_modes(tiny_segmenter, mode, rng):
    """Every PIL mode becomes the RGB image it shows (alpha composited on white, high bit
    depths rescaled), and is segmented exactly as that RGB array."""
    from onepass_ovs.images import to_tensor

    arr = (rng.random((33, 47, 3)) * 255).astype(np.uint8)
    img = Image.fromarray(arr, "RGB")
    if mode == "I;16":
        raw = (rng.random((33, 47)) * 65535).astype(np.uint16)
        img = Image.fromarray(raw)
        grey = np.round(raw / 65535.0 * 255.0)
        expected = np.repeat(grey[..., None], 3, -1)
    elif mode == "F":
        raw = rng.random((33, 47)).astype(np.float32)
        img = Image.fromarray(raw, "F")
        expected = np.repeat(np.round(raw * 255.0)[..., None], 3, -1)
    elif mode == "I":
        raw = (rng.random((33, 47)) * 1000).astype(np.int32)
        img = Image.fromarray(raw, "I")
        grey = np.round(raw / raw.max() * 255.0)
        expected = np.repeat(grey[..., None], 3, -1)
    else:
        if mode in ("RGBA", "LA"):
            alpha = (rng.random((33, 47)) * 255).astype(np.uint8)
            rgba = np.concatenate([arr, alpha[..., None]], -1)
            img = Image.fromarray(rgba, "RGBA").convert(mode)
        else:
            img = img.convert(mode)
        shown = np.asarray(img.convert("RGBA")).astype(np.float64)
        a = shown[..., 3:] / 255.0
        expected = np.round(shown[..., :3] * a + 255.0 * (1 - a))  # on white
    got = to_tensor(img)[0].permute(1, 2, 0).numpy() * 255.0
    np.testing.assert_allclose(got, expected, atol=1.01)  # rounding of the composite
    res = tiny_segmenter.segment(img, VOCAB)
    assert res.label_map.shape == (33, 47)
    ref = tiny_segmenter.segment(np.round(got).astype(np.uint8), VOCAB)
    np.testing.assert_array_equal(res.label_map, ref.label_map)


def test_exif_orientation_applied(tiny_segmenter, rng, tmp_path):
    arr = (rng.random((30, 50, 3)) * 255).astype(np.uint8)
    img = Image.fromarray(arr)
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    path = tmp_path / "rotated.jpg"
    img.save(path, exif=exif)
    res = tiny_segmenter.segment(path, VOCAB)
    assert res.label_map.shape == (50, 30)


def test_numpy_float_bgr_and_tensor_inputs_agree(tiny_segmenter, rgb_image):
    ref = tiny_segmenter.segment(rgb_image, VOCAB)
    as_float = tiny_segmenter.segment(rgb_image.astype(np.float32) / 255.0, VOCAB)
    as_bgr = tiny_segmenter.segment(rgb_image[..., ::-1].copy(), VOCAB, image_format="BGR")
    chw = torch.from_numpy(rgb_image).permute(2, 0, 1)
    as_tensor = tiny_segmenter.segment(chw, VOCAB)
    as_batch = tiny_segmenter.segment(chw[None].float() / 255, VOCAB)
    for other in (as_float, as_bgr, as_tensor):
        np.testing.assert_allclose(other.probs, ref.probs, atol=1e-5)
    assert isinstance(as_batch, list) and len(as_batch) == 1
    np.testing.assert_allclose(as_batch[0].probs, ref.probs, atol=1e-5)
    wrong_order = tiny_segmenter.segment(rgb_image[..., ::-1].copy(), VOCAB)
    assert not np.allclose(wrong_order.probs, ref.probs, atol=1e-4)


@pytest.mark.parametrize(
    ("image", "error", "match"),
    [
        (np.zeros((4, 4, 2), np.uint8), ValueError, "numpy images"),
        (np.full((8, 8, 3), 3.0, np.float32), ValueError, r"\[0, 1\]"),
        (torch.zeros(2, 8, 8), ValueError, "3 channels"),
        (12, TypeError, "unsupported image type"),
    ],
)
def test_bad_images(tiny_segmenter, image, error, match):
    with pytest.raises(error, match=match):
        tiny_segmenter.segment(image, VOCAB)


def test_file_errors_name_the_file(tiny_segmenter, tmp_path):
    missing = tmp_path / "nope.png"
    with pytest.raises(FileNotFoundError, match="nope.png"):
        tiny_segmenter.segment(missing, VOCAB)
    text = tmp_path / "notes.png"
    text.write_text("this is not an image")
    with pytest.raises(ValueError, match="notes.png"):
        tiny_segmenter.segment(text, VOCAB)
    corrupt = tmp_path / "broken.png"
    good = tmp_path / "good.png"
    noise = (np.random.default_rng(1).random((64, 64, 3)) * 255).astype(np.uint8)
    Image.fromarray(noise).save(good)
    corrupt.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises((ValueError, OSError), match="broken.png"):
        tiny_segmenter.segment(corrupt, VOCAB)


@pytest.mark.parametrize("vocab", [[], ["cat", "cat"], ["a, b", "b"]])
def test_bad_vocabularies(tiny_segmenter, rgb_image, vocab):
    with pytest.raises(ValueError):
        tiny_segmenter.segment(rgb_image, vocab)


def test_unknown_threshold(tiny_segmenter, rgb_image):
    res = tiny_segmenter.segment(rgb_image, VOCAB)
    best = res.probs.max(0)
    threshold = float(np.median(best))
    thresholded = tiny_segmenter.segment(rgb_image, VOCAB, unknown_threshold=threshold)
    unknown = thresholded.label_map == -1
    # the label map and probs may round differently (DeOP's assembly is evaluated from
    # resized masks for the label map): pixels within float rounding of the threshold aside
    clear = np.abs(best - threshold) > 1e-6
    np.testing.assert_array_equal(unknown[clear], (best < threshold)[clear])
    np.testing.assert_array_equal(thresholded.label_map[~unknown], res.label_map[~unknown])
    assert "unknown" in thresholded.fractions()
    with pytest.raises(ValueError):
        tiny_segmenter.segment(rgb_image, VOCAB, unknown_threshold=2.0)


def test_unknown_threshold_on_assembled_scores():
    """Assembled (DeOP-style) scores whose confidence varies over the image: the pixels
    below the threshold are exactly those whose best probability is below it."""
    from onepass_ovs.images import Geometry
    from onepass_ovs.models.assembly import AssembledScores

    gen = torch.Generator().manual_seed(0)
    scores = AssembledScores(torch.randn(1, 6, 8, 10, generator=gen) * 4,
                             torch.randn(1, 6, 5, generator=gen) * 3, (32, 40))
    geometry = Geometry((45, 61), (32, 40), (32, 40))
    classes = ["a", "b", "c", "d"]
    plain = SegmentationResult(scores, classes, geometry)
    best = plain.probs.max(0)
    assert best.max() - best.min() > 0.2
    threshold = float(np.median(best))
    res = SegmentationResult(scores, classes, geometry, unknown_threshold=threshold)
    unknown = res.label_map == -1
    clear = np.abs(best - threshold) > 1e-5
    assert clear.mean() > 0.9
    np.testing.assert_array_equal(unknown[clear], (best < threshold)[clear])
    np.testing.assert_array_equal(res.label_map[~unknown], plain.label_map[~unknown])
    top2 = np.sort(plain.probs, axis=0)[-2:]
    sure = (top2[1] - top2[0]) > 1e-5
    np.testing.assert_array_equal(plain.label_map[sure], plain.probs.argmax(0)[sure])


def test_size_override_changes_working_resolution(tiny_segmenter, rgb_image, monkeypatch):
    seen = []
    original = tiny_segmenter.model.predict_scores

    def spy(images, text, sizes):
        seen.append(tuple(images.shape[-2:]))
        return original(images, text, sizes)

    monkeypatch.setattr(tiny_segmenter.model, "predict_scores", spy)
    res = tiny_segmenter.segment(rgb_image, VOCAB, size=(96, 128))
    res_default = tiny_segmenter.segment(rgb_image, VOCAB)
    assert seen == [(96, 128), (64, 96)]  # default: short side 64 -> 64 x 87, padded to 32
    assert res.label_map.shape == res_default.label_map.shape == (45, 61)


def test_result_png_masks_overlay_save(tiny_segmenter, rgb_image, tmp_path):
    res = tiny_segmenter.segment(rgb_image, VOCAB, unknown_threshold=0.4)
    png = res.save(tmp_path / "labels.png")
    back = Image.open(png)
    assert back.mode == "P"
    arr = np.asarray(back).astype(np.int32)
    np.testing.assert_array_equal(np.where(arr == 255, -1, arr), res.label_map)
    np.save(tmp_path / "x.npy", res.label_map)
    res.save(tmp_path / "labels.npy")
    np.testing.assert_array_equal(np.load(tmp_path / "labels.npy"), res.label_map)
    with pytest.raises(ValueError, match=".jpg"):
        res.save(tmp_path / "labels.jpg")
    masks = res.masks()
    assert set(masks) == {VOCAB[i] for i in np.unique(res.label_map) if i >= 0}
    for name, mask in masks.items():
        np.testing.assert_array_equal(mask, res.label_map == VOCAB.index(name))
    over = res.overlay(rgb_image, alpha=1.0, legend=False)
    over_arr = np.asarray(over)
    # "background" (a class of VOCAB) and unknown pixels stay unpainted
    known = (res.label_map >= 0) & (res.label_map != VOCAB.index("background"))
    np.testing.assert_array_equal(over_arr[known], res.colour_map()[known])
    np.testing.assert_array_equal(over_arr[~known], rgb_image[~known])
    np.testing.assert_array_equal(np.asarray(res.overlay(rgb_image, alpha=0.0, legend=False)), rgb_image)
    with pytest.raises(ValueError, match="segmented image"):
        res.overlay(rgb_image[:10])
