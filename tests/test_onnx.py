"""ONNX export: the onnxruntime Segmenter reproduces the torch Segmenter.

Reference: the torch Segmenter the folder was exported from (SED: the same weights with
category early rejection off, which the export documents). Tolerances: class
probabilities within 1e-3 (float32 graph vs eager; observed ~1e-6), label maps equal on
at least 99.5% of pixels.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from onepass_ovs import Segmenter  # noqa: E402
from onepass_ovs.models.registry import build_model  # noqa: E402
from onepass_ovs.toy import scenes  # noqa: E402

PROB_TOL = 1e-3
LABEL_AGREEMENT = 0.995
VOCABULARY = list(scenes.CLASS_NAMES)  # 1 + shapes x colours: far more than the 2 traced


def _torch_segmenter(name: str) -> Segmenter:
    if name == "demo":
        return Segmenter.from_pretrained("demo", device="cpu")
    return Segmenter.from_config(name, device="cpu", seed=0)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """name -> (torch reference Segmenter, onnx Segmenter, folder); built lazily."""
    cache: dict[str, tuple[Segmenter, Segmenter, object]] = {}

    def get(name: str):
        if name not in cache:
            seg = _torch_segmenter(name)
            folder = seg.export_onnx(tmp_path_factory.mktemp(f"onnx_{name}"))
            reference = seg
            if seg.config.family == "sed":  # the documented export: no rejection
                config = seg.config.replace(**{"family_config.rejection_top_k": 0})
                model = build_model(config)
                model.load_state_dict(seg.model.state_dict())
                reference = Segmenter(model, device="cpu")
            cache[name] = (reference, Segmenter.from_onnx(folder), folder)
        return cache[name]

    return get


def _images(rng) -> list[np.ndarray]:
    """Two shapes scenes (the traced size differs) and a non-square random image, so the
    batch covers several padded sizes and a padding (valid-region) mask."""
    batch = scenes.render_scenes(seed=7, n=2, size=96)
    noise = (rng.random((70, 113, 3)) * 255).astype(np.uint8)
    return [batch.images[0], batch.images[1], noise]


def _compare(reference_results, onnx_results):
    for ref, got in zip(reference_results, onnx_results, strict=True):
        assert ref.label_map.shape == got.label_map.shape
        difference = np.abs(ref.probs - got.probs).max()
        assert difference <= PROB_TOL, f"probabilities differ by {difference}"
        agreement = (ref.label_map == got.label_map).mean()
        assert agreement >= LABEL_AGREEMENT, f"label maps agree on {agreement:.4f} only"


@pytest.mark.parametrize("name", ["demo", "deop-tiny", "clip-tiny", "sed-tiny"])
def test_onnx_matches_torch(exported, rng, name):
    reference, onnx_seg, _ = exported(name)
    images = _images(rng)
    # batch_size 2: the two scenes share a padded size and go through one graph call
    _compare(reference.segment(images, VOCABULARY, batch_size=2),
             onnx_seg.segment(images, VOCABULARY, batch_size=2))


def test_onnx_folder_contents_and_text_side(exported):
    reference, onnx_seg, folder = exported("demo")
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["config.json", "image_model.onnx", "onnx.json", "text.safetensors"]
    assert json.loads((folder / "onnx.json").read_text())["outputs"] == ["mask_logits", "class_probs"]
    assert onnx_seg.config.preprocess == reference.config.preprocess
    # the text side runs in torch from text.safetensors: the same embeddings exactly
    vocabulary = ["red circle", "blue square, navy square", "background"]
    assert torch.equal(onnx_seg.encode_text(vocabulary), reference.encode_text(vocabulary))


def test_onnx_sliding_windows_and_background(exported):
    reference, onnx_seg, _ = exported("demo")
    image = scenes.render_scenes(seed=3, n=1, size=128).images[0]
    options = {"sliding_window": (64, 32), "background": "background, floor",
               "unknown_threshold": 0.2}
    vocabulary = ["background, floor", *scenes.CLASS_NAMES[1:]]
    _compare([reference.segment(image, vocabulary, **options)],
             [onnx_seg.segment(image, vocabulary, **options)])


def test_sed_export_turns_rejection_off(exported):
    _, onnx_seg, folder = exported("sed-tiny")
    assert onnx_seg.config.family_config.rejection_top_k == 0
    assert json.loads((folder / "onnx.json").read_text())["max_batch"] == 1


def test_onnx_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        Segmenter.from_onnx(tmp_path)
    gkc = Segmenter.from_config("gkc-tiny", device="cpu", seed=0)
    with pytest.raises(NotImplementedError, match="gkc"):
        gkc.export_onnx(tmp_path / "gkc")
