"""Encode once, decode any vocabulary: seg.segment(seg.encode(x), v) == seg.segment(x, v)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from onepass_ovs import Segmenter
from onepass_ovs.encoding import ImageEncoding
from onepass_ovs.images import prepare, to_tensor

TINY = ["deop-tiny", "clip-tiny", "sed-tiny", "gkc-tiny"]
VOCAB_A = ["red circle", "blue square, blue box", "background"]
VOCAB_B = ["green triangle", "sky", "a photo of grass", "yellow star", "floor, wall"]
WINDOW = 96  # the wide image is segmented in windows, the small ones in one pass
KW = {"size": 64, "sliding_window": WINDOW}  # every tiny preset at a 64-pixel short side


def _image(h, w, seed):
    return (np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8)


IMAGES = [_image(48, 64, 1), _image(64, 200, 2), _image(50, 60, 3)]


@pytest.fixture(scope="module", params=TINY)
def seg(request):
    return Segmenter.from_config(request.param, device="cpu", seed=0)


def _count_encodes(seg, monkeypatch):
    calls = []
    original = seg.model.encode_image

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(seg.model, "encode_image", counting)
    return calls


def _assert_same(got, want):
    assert got.classes == want.classes
    np.testing.assert_array_equal(got.label_map, want.label_map)
    np.testing.assert_allclose(got.probs, want.probs, rtol=0, atol=1e-6)


def test_segment_encoding_equals_segment_images(seg, monkeypatch):
    emb = seg.encode(IMAGES, batch_size=2, **KW)
    assert isinstance(emb, ImageEncoding) and len(emb) == 3 and emb.many
    assert emb.images[1].windows is not None and len(emb.images[1].passes) > 1
    assert emb.images[0].windows is None
    assert emb.nbytes > 0
    calls = _count_encodes(seg, monkeypatch)
    for vocab in (VOCAB_A, VOCAB_B):
        fast = seg.segment(emb, vocab)
        assert not calls, "segment(encoding) ran the image pass again"
        full = seg.segment(IMAGES, vocab, batch_size=2, **KW)
        assert calls  # the reference did run it
        calls.clear()
        assert len(fast) == len(full) == 3
        for got, want in zip(fast, full, strict=True):
            _assert_same(got, want)


def test_background_and_threshold_through_an_encoding(seg):
    emb = seg.encode(IMAGES[1], **KW)
    assert not emb.many
    kwargs = {"background": "floor", "unknown_threshold": 0.3}
    got = seg.segment(emb, VOCAB_B, **kwargs)
    want = seg.segment(IMAGES[1], VOCAB_B, **KW, **kwargs)
    _assert_same(got, want)
    # one image picked out of a list encoding gives that image's result, unlisted
    emb_list = seg.encode(IMAGES, **KW)
    _assert_same(seg.segment(emb_list[2], VOCAB_A), seg.segment(IMAGES[2], VOCAB_A, **KW))


def test_classify_presence_against_the_model_directly(seg):
    image = IMAGES[0]
    presence = seg.classify(seg.encode(image, **KW), VOCAB_B)
    assert list(presence) == sorted(presence, key=lambda c: -presence[c])
    assert set(presence) == set(VOCAB_B)
    # independent reference: the model's scores on the prepared canvas, normalised per
    # pixel over classes, maximum over the unpadded region
    canvas, geometry = prepare(to_tensor(image)[0], seg.config.preprocess, KW["size"])
    with torch.no_grad():
        scores = seg.model.predict_scores(canvas[None], seg.encode_text(VOCAB_B), [geometry.resized])
    scores = (scores if isinstance(scores, torch.Tensor) else scores.dense())[0].float()
    stride = geometry.padded[0] // scores.shape[-2]
    h, w = (-(-n // stride) for n in geometry.resized)
    valid = scores[:, :h, :w]
    probs = (valid + 1e-8) / (valid.sum(0, keepdim=True) + len(VOCAB_B) * 1e-8)
    want = probs.flatten(1).amax(1)
    got = torch.tensor([presence[c] for c in VOCAB_B])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert (got >= 0).all() and (got <= 1 + 1e-6).all() and got.max() >= 1 / len(VOCAB_B)
    # raw images are encoded on the way; lists give lists
    many = seg.classify(IMAGES[:2], VOCAB_B, **KW)
    assert isinstance(many, list) and many[0] == pytest.approx(presence)


def test_encoding_misuse_is_refused(seg):
    emb = seg.encode(IMAGES[0], size=64)
    other = Segmenter.from_config(seg.config.name, device="cpu", seed=1)
    with pytest.raises(ValueError, match="another model"):
        other.segment(emb, VOCAB_A)
    with pytest.raises(ValueError, match="size"):
        seg.segment(emb, VOCAB_A, size=64)
    with pytest.raises(ValueError, match="sliding_window"):
        seg.classify(emb, VOCAB_A, sliding_window=64)
    moved = emb.to("cpu")
    _assert_same(seg.segment(moved, VOCAB_A), seg.segment(emb, VOCAB_A))

