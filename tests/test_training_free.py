"""The training-free ``clip`` family: loading (Hub cache offline, tags, folders), severance
variants against their formulas, dense and mask-pooled classification, background, CLI."""

from __future__ import annotations

import copy
import importlib.util
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from typer.testing import CliRunner

from onepass_ovs import ModelNotAvailableError, SegmentationResult, Segmenter
from onepass_ovs.config import ClipConfig
from onepass_ovs.models.towers import TINY_CLIP_CFG, create_clip
from onepass_ovs.models.training_free import TrainingFreeCLIP, clip_model_config

_spec = importlib.util.spec_from_file_location(
    "_hub_helpers", Path(__file__).with_name("_hub_helpers.py")
)
hub_helpers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(hub_helpers)
COMMIT = hub_helpers.COMMIT

TINY_CFG = {**copy.deepcopy(TINY_CLIP_CFG), "quick_gelu": True}
TAG_MEAN, TAG_STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
VOCAB = ["cat", "dog", "grass, lawn"]


def _save_open_clip(folder, seed=0, logit_scale=50.0):
    """A random tiny open_clip model written in open_clip's Hub format."""
    torch.manual_seed(seed)
    clip = create_clip(ClipConfig(model_cfg=copy.deepcopy(TINY_CFG))).eval()
    with torch.no_grad():
        clip.logit_scale.fill_(math.log(logit_scale))
    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "model_cfg": TINY_CFG,
        "preprocess_cfg": {"mean": TAG_MEAN, "std": TAG_STD, "interpolation": "bicubic"},
    }
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    state = {k: v.contiguous() for k, v in clip.state_dict().items()}
    save_file(state, str(folder / "open_clip_model.safetensors"))
    return clip


@pytest.fixture(scope="module")
def open_clip_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("open_clip_tiny")
    clip = _save_open_clip(folder)
    return folder, clip


@pytest.fixture
def offline_cache(open_clip_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder, _ = open_clip_dir
    hub_helpers.populate_hf_cache(tmp_path, "someone/tiny-clip", sorted(folder.iterdir()))
    return tmp_path


def _images(seed=0, n=2, size=(64, 64)):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, *size, generator=g)


# -- loading -----------------------------------------------------------------------------------


def test_hub_repo_from_prepopulated_cache_offline(open_clip_dir, offline_cache):
    _, clip = open_clip_dir
    seg = Segmenter.from_pretrained("clip:hf-hub:someone/tiny-clip", cache_dir=offline_cache)
    cfg = seg.config
    assert cfg.family == "clip" and cfg.clip.severance == "clearclip"
    assert cfg.clip.model_cfg["quick_gelu"] is True  # from the repo's open_clip_config.json
    assert cfg.clip.logit_scale == pytest.approx(50.0)  # CLIP's own learned scale
    assert cfg.preprocess.clip_mean == pytest.approx(TAG_MEAN)
    assert len(seg.model.text.templates) == 80
    torch.testing.assert_close(seg.model.clip_visual.conv1.weight, clip.visual.conv1.weight)
    torch.testing.assert_close(seg.model.text.token_embedding.weight, clip.token_embedding.weight)
    res = seg.segment(np.zeros((40, 70, 3), np.uint8), VOCAB)
    assert res.label_map.shape == (40, 70)
    # a pinned revision and the string without the clip: prefix resolve too
    Segmenter.from_clip(f"hf-hub:someone/tiny-clip@{COMMIT}", cache_dir=offline_cache)


def test_pretrained_tag_resolves_quick_gelu_and_preprocessing(
    open_clip_dir, offline_cache, monkeypatch
):
    import open_clip
    from open_clip import factory, pretrained

    from onepass_ovs.hub import resolve_clip

    plain_cfg = copy.deepcopy(TINY_CLIP_CFG)  # the architecture name alone: no QuickGELU
    monkeypatch.setitem(factory._MODEL_CONFIGS, "Onepass-Tiny", plain_cfg)
    tag = {"hf_hub": "someone/tiny-clip/", "quick_gelu": True, "mean": TAG_MEAN, "std": TAG_STD}
    monkeypatch.setitem(pretrained._PRETRAINED, "Onepass-Tiny", {"shapes": tag})
    source = resolve_clip("clip:Onepass-Tiny/shapes", cache_dir=offline_cache)
    assert source.model_cfg["quick_gelu"] is True
    assert source.weights.name == "open_clip_model.safetensors"  # never the pickled .bin

    seg = Segmenter.from_clip("Onepass-Tiny", pretrained="shapes", cache_dir=offline_cache)
    mlp_act = seg.model.clip_visual.blocks[0].mlp.gelu
    assert isinstance(mlp_act, open_clip.transformer.QuickGELU)
    assert seg.config.preprocess.clip_std == pytest.approx(TAG_STD)
    # the weights sit in the architecture the tag asks for: the image tower equals open_clip's
    _, clip = open_clip_dir
    images = _images()
    mean, std = torch.tensor(TAG_MEAN).view(1, 3, 1, 1), torch.tensor(TAG_STD).view(1, 3, 1, 1)
    normed = (images - mean) / std
    with torch.no_grad():
        got = seg.model.clip_visual.global_embedding(normed)
        torch.testing.assert_close(got, clip.encode_image(normed), atol=1e-5, rtol=1e-5)
    with pytest.raises(ModelNotAvailableError, match="no tag 'nope'"):
        Segmenter.from_clip("clip:Onepass-Tiny/nope", cache_dir=offline_cache)
    with pytest.raises(ValueError, match="names no pretrained weights"):
        Segmenter.from_clip("clip:Onepass-Tiny")


def test_offline_not_cached_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotAvailableError) as info:
        Segmenter.from_pretrained("clip:ViT-B-16/openai", cache_dir=tmp_path)
    message = str(info.value)
    assert "clip:ViT-B-16/openai" in message and "disabled" in message and "demo" in message
    with pytest.raises(ModelNotAvailableError, match="clip:hf-hub:nobody/missing"):
        Segmenter.from_pretrained("clip:hf-hub:nobody/missing", cache_dir=tmp_path)
    with pytest.raises(ModelNotAvailableError, match="unknown CLIP model"):
        Segmenter.from_pretrained("clip:No-Such-ViT/openai")


def test_pickled_checkpoints_are_refused(open_clip_dir, tmp_path):
    folder, _ = open_clip_dir
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(folder / "open_clip_config.json", pickled)
    (pickled / "open_clip_pytorch_model.bin").write_bytes(b"not to be unpickled")
    with pytest.raises(ModelNotAvailableError, match="never loads"):
        Segmenter.from_clip(f"clip:local-dir:{pickled}")
    with pytest.raises(ModelNotAvailableError, match="never unpickles"):
        Segmenter.from_clip("ViT-B-16", pretrained=str(pickled / "open_clip_pytorch_model.bin"))


def test_local_folder_and_save_round_trip(open_clip_dir, tmp_path):
    folder, _ = open_clip_dir
    seg = Segmenter.from_clip(f"clip:local-dir:{folder}", severance="identity", templates="single")
    plain = Segmenter.from_clip(str(folder), severance="identity", templates="single")
    saved = seg.save_pretrained(tmp_path / "saved")
    assert sorted(p.name for p in saved.iterdir()) == ["config.json", "model.safetensors"]
    loaded = Segmenter.from_pretrained(saved)
    assert loaded.config.to_dict() == seg.config.to_dict()
    assert loaded.config.clip.model_cfg["quick_gelu"] is True
    image = (np.random.default_rng(0).random((50, 70, 3)) * 255).astype(np.uint8)
    ref = seg.segment(image, VOCAB)
    np.testing.assert_allclose(loaded.segment(image, VOCAB).probs, ref.probs, atol=1e-6)
    np.testing.assert_allclose(plain.segment(image, VOCAB).probs, ref.probs, atol=1e-6)


def test_clip_inside_a_saved_deop_model(tiny_saved, tiny_segmenter):
    seg = Segmenter.from_clip(f"clip:{tiny_saved}", templates="single")
    assert seg.config.family == "clip"
    assert seg.config.clip.logit_scale == tiny_segmenter.config.family_config.anchors.logit_scale
    deop_state = tiny_segmenter.model.state_dict()
    own = seg.model.state_dict()
    assert own and all(k.startswith(("clip_visual.", "text.")) for k in own)
    assert not any("learned_pos" in k for k in own)
    for key, value in own.items():
        torch.testing.assert_close(value, deop_state[key])


def test_unsupported_towers_are_named():
    with pytest.raises(ValueError, match="ResNet"):
        clip_model_config("RN50")
    with pytest.raises(ValueError, match="timm"):
        clip_model_config("ViT-B-16-SigLIP")


# -- the dense model against its formulas ------------------------------------------------------


def _tiny_model(severance, seed=1, templates="single"):
    torch.manual_seed(seed)
    cfg = clip_model_config(copy.deepcopy(TINY_CLIP_CFG), severance=severance, templates=templates)
    return TrainingFreeCLIP(cfg).eval()


def _reference_dense(model, images, variant, coverage=None):
    """Direct computation: plain blocks, then the last block by its formula, ln_post, proj."""
    vis = model.clip_visual
    pre = model.config.preprocess
    mean = torch.tensor(pre.clip_mean).view(1, 3, 1, 1)
    std = torch.tensor(pre.clip_std).view(1, 3, 1, 1)
    x = vis.conv1((images - mean) / std).flatten(2).transpose(1, 2)
    x = torch.cat([vis.class_embedding.expand(x.shape[0], 1, -1), x], 1)
    x = vis.ln_pre(x + vis.positional_embedding)  # 64 x 64 images: the native 4 x 4 grid
    for block in vis.blocks[:-1]:
        x = block(x)
    last = vis.blocks[-1]
    heads, width = vis.num_heads, vis.width
    d = width // heads
    y = last.ln_1(x)
    w_q, _, w_v = last.attn.in_proj_weight.split(width)
    b_q, _, b_v = last.attn.in_proj_bias.split(width)
    q = (y @ w_q.T + b_q).unflatten(-1, (heads, d)).transpose(1, 2)
    v = (y @ w_v.T + b_v).unflatten(-1, (heads, d)).transpose(1, 2)
    t = x.shape[1]
    if variant == "none":
        x = last(x)
    else:
        if variant == "clearclip":
            attn = (q @ q.transpose(-1, -2) / math.sqrt(d)).softmax(-1)
        elif variant == "identity":
            attn = torch.eye(t).expand(1, 1, t, t)
        elif variant == "mask-guided":
            cov = coverage.flatten(2).transpose(1, 2).clamp(1e-4, 1 - 1e-4)  # (B, L, M)
            m = torch.cat([torch.ones(cov.shape[0], 1, cov.shape[2]), cov], 1)
            attn = (m @ m.transpose(1, 2)).softmax(-1)[:, None]
        out = last.attn.out_proj((attn @ v).transpose(1, 2).reshape(x.shape))
        if variant == "clearclip":
            x = out  # ClearCLIP: no residual, no FFN
        else:
            x = x + out
            x = x + last.mlp(last.ln_2(x))
    dense = F.normalize(vis.ln_post(x[:, 1:]) @ vis.proj, dim=-1)
    return dense.transpose(1, 2).unflatten(-1, (4, 4))


@pytest.mark.parametrize("variant", ["clearclip", "identity", "mask-guided", "none"])
@torch.no_grad()
def test_severance_variants_match_their_formula(variant):
    model = _tiny_model(variant)
    images = _images()
    masks = coverage = None
    if variant == "mask-guided":
        masks = (torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(3)) > 0.5).float()
        coverage = F.avg_pool2d(masks, 16)
    got = model.dense_features(images, None, masks)
    expected = _reference_dense(model, images, variant, coverage)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    if variant != "none":
        assert not torch.allclose(got, _reference_dense(model, images, "none"), atol=1e-3)
    # dense classification: softmax over classes of logit_scale * cosine
    text = model.text(VOCAB)
    if masks is None:
        scores = model.predict_scores(images, text, None)
    else:
        scores = model.classify(got, text)
    logits = model.config.clip.logit_scale * torch.einsum("behw,ke->bkhw", expected, text)
    torch.testing.assert_close(scores, logits.softmax(1), atol=1e-5, rtol=1e-5)


def test_mask_guided_without_masks_is_an_error():
    seg = Segmenter(_tiny_model("mask-guided"), device="cpu")
    with pytest.raises(ValueError, match="needs masks"):
        seg.segment(np.zeros((64, 64, 3), np.uint8), VOCAB)


def test_text_side_is_the_80_template_ensemble_with_synonyms_averaged():
    model = _tiny_model("clearclip", templates="imagenet80")
    with torch.no_grad():
        prompts = model.text.encode_prompts([t.format("cat") for t in model.text.templates])
        expected = F.normalize(F.normalize(prompts, dim=-1).mean(0), dim=-1)
        torch.testing.assert_close(model.text(["cat"])[0], expected, atol=1e-5, rtol=1e-5)
        both = model.text(["cat, kitty"])[0]
        mean = F.normalize(model.text(["cat"])[0] + model.text(["kitty"])[0], dim=-1)
        torch.testing.assert_close(both, mean, atol=1e-5, rtol=1e-5)


# -- masks pooling, background ----------------------------------------------------------------


@torch.no_grad()
def test_masks_are_pooled_classified_and_painted():
    model = _tiny_model("identity")  # DeOP's training-free demo: identity severance + pooling
    seg = Segmenter(model, device="cpu")
    image = _images(n=1, size=(64, 96))[0]
    a = torch.zeros(64, 96, dtype=torch.bool)
    a[:, :40] = True
    b = torch.zeros(64, 96, dtype=torch.bool)
    b[10:50, 30:70] = True  # overlaps a in columns 30..39; columns 70.. uncovered
    res = seg.segment(image, VOCAB, masks=torch.stack([a, b]), size=(64, 96))

    text = model.text(VOCAB)
    dense = model.dense_features(image[None])[0]  # (E, 4, 6): no resize, no padding
    scale = model.config.clip.logit_scale
    expected = torch.zeros(3, 64, 96)
    for mask in (a, b):
        weights = F.avg_pool2d(mask[None, None].float(), 16)[0, 0].flatten()
        pooled = F.normalize((dense.flatten(1) * weights).sum(1) / weights.sum(), dim=0)
        probs = (scale * text @ pooled).softmax(0)
        expected += probs[:, None, None] * mask.float()
    dense_probs = F.interpolate(
        model.classify(dense[None], text), size=(64, 96), mode="bilinear", align_corners=False
    )[0]
    uncovered = ~(a | b)
    expected += dense_probs * uncovered.float()
    expected /= expected.sum(0, keepdim=True)
    np.testing.assert_allclose(res.probs, expected.numpy(), atol=1e-5)
    assert res.label_map.shape == (64, 96)
    # mask-guided severance reads the same masks inside the CLIP pass
    guided = Segmenter(_tiny_model("mask-guided"), device="cpu")
    out = guided.segment(image, VOCAB, masks=torch.stack([a, b]).numpy(), size=(64, 96))
    assert not np.allclose(out.probs, res.probs, atol=1e-4)


def test_mask_argument_errors(tiny_segmenter):
    seg = Segmenter(_tiny_model("identity"), device="cpu")
    image = np.zeros((30, 40, 3), np.uint8)
    with pytest.raises(ValueError, match="at the image's size"):
        seg.segment(image, VOCAB, masks=np.ones((2, 31, 40), bool))
    with pytest.raises(ValueError, match="0/1"):
        seg.segment(image, VOCAB, masks=np.full((1, 30, 40), 255, np.uint8))
    with pytest.raises(ValueError, match="masks for 1 images but 2"):
        seg.segment([image, image], VOCAB, masks=[np.ones((1, 30, 40), bool)])
    with pytest.raises(ValueError, match="'clip' family"):
        tiny_segmenter.segment(image, VOCAB, masks=np.ones((1, 30, 40), bool))


@torch.no_grad()
def test_background_sums_its_synonyms_and_takes_low_confidence_pixels():
    model = _tiny_model("clearclip", seed=4)
    seg = Segmenter(model, device="cpu")
    image = _images(seed=5, n=1, size=(64, 80))[0]
    vocab = ["cat", "background, sky, wall", "dog"]
    res = seg.segment(image, vocab, background="background", size=(64, 80))

    rows = model.text(["cat", "dog", "background", "sky", "wall"])
    rows = model.predict_scores(image[None], rows)[0]
    merged = torch.stack([rows[0], rows[2:].sum(0), rows[1]])
    direct = SegmentationResult(merged, vocab, res.geometry)
    np.testing.assert_allclose(res.probs, direct.probs, atol=1e-6)
    np.testing.assert_array_equal(res.label_map, direct.label_map)

    threshold = float(np.quantile(res.probs.max(0), 0.5))
    low = seg.segment(image, vocab, background="sky", unknown_threshold=threshold, size=(64, 80))
    expected = np.where(res.probs.max(0) < threshold, 1, res.probs.argmax(0))
    np.testing.assert_array_equal(low.label_map, expected)
    assert (low.label_map >= 0).all()
    with pytest.raises(ValueError, match="not in the vocabulary"):
        seg.segment(image, ["cat", "dog"], background="background")


def test_background_works_for_any_family(tiny_segmenter, rgb_image):
    res = tiny_segmenter.segment(
        rgb_image, ["cat", "background"], background="background", unknown_threshold=0.9
    )
    plain = tiny_segmenter.segment(rgb_image, ["cat", "background"], unknown_threshold=0.9)
    np.testing.assert_array_equal(res.label_map, np.where(plain.label_map < 0, 1, plain.label_map))


# -- CLI ---------------------------------------------------------------------------------------


def test_cli_default_model_offline_says_so(tmp_path, monkeypatch):
    from PIL import Image

    from onepass_ovs.cli import DEFAULT_MODEL, segment_app

    assert DEFAULT_MODEL == "clip:ViT-B-16/openai"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = tmp_path / "img.png"
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(path)
    result = CliRunner().invoke(segment_app, [str(path), "--classes", "cat", "-o", str(tmp_path)])
    assert result.exit_code == 2
    assert "clip:ViT-B-16/openai" in result.output and "disabled" in result.output
    assert "--model demo" in result.output
