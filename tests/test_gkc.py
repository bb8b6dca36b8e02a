"""The GKC family: Mask2Former blocks, the model, its text side, and its training pieces."""

from __future__ import annotations

import copy
import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from onepass_ovs import Segmenter
from onepass_ovs.config import ConfigError
from onepass_ovs.models.assembly import semantic_scores
from onepass_ovs.models.gkc import GKC, GKCConfig
from onepass_ovs.models.mask2former import (
    DeformablePixelDecoder,
    MaskedAttentionDecoder,
    MultiScaleDeformableAttention,
    multi_scale_deformable_attention,
)
from onepass_ovs.models.registry import build_model, config_from_dict, preset_config
from onepass_ovs.training.gkc_losses import (
    DistillationScale,
    distillation_over_outputs,
    draw_synonyms,
    eligible_synonyms,
    image_vocabulary,
    teacher_region_inputs,
    text_guided_distillation_loss,
)


@pytest.fixture(scope="module")
def tiny_gkc():
    torch.manual_seed(0)
    return Segmenter.from_config("gkc-tiny", device="cpu", seed=0)


def _perturb(model: torch.nn.Module, seed: int = 1, std: float = 0.3) -> None:
    """Non-trivial weights: open_clip zero-inits the last BN of each residual branch and
    deformable attention starts with uniform weights; nudge everything so tests see
    real mixing."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * std)


# -- deformable attention ------------------------------------------------------------------------


def _bilinear_direct(value: torch.Tensor, x: float, y: float) -> torch.Tensor:
    """value (d, h, w); (x, y) in [0, 1] with pixel i centred at (i + 0.5) / size; zero
    outside. Explicit four-corner loop."""
    d, h, w = value.shape
    px, py = x * w - 0.5, y * h - 0.5
    x0, y0 = math.floor(px), math.floor(py)
    out = torch.zeros(d, dtype=value.dtype)
    for yy in (y0, y0 + 1):
        for xx in (x0, x0 + 1):
            weight = (1 - abs(px - xx)) * (1 - abs(py - yy))
            if 0 <= xx < w and 0 <= yy < h:
                out += weight * value[:, yy, xx]
    return out


def test_deformable_attention_matches_direct_bilinear_loops():
    torch.manual_seed(0)
    b, heads, d, q, points = 2, 2, 3, 4, 2
    shapes = [(3, 5), (2, 2)]
    s = sum(h * w for h, w in shapes)
    value = torch.randn(b, s, heads, d, dtype=torch.float64)
    # some samples fall outside the maps (zero padding) and on exact borders
    locations = torch.rand(b, q, heads, len(shapes), points, 2, dtype=torch.float64) * 1.4 - 0.2
    locations[0, 0, 0, 0, 0] = torch.tensor([0.0, 1.0])
    weights = torch.rand(b, q, heads, len(shapes), points, dtype=torch.float64)
    out = multi_scale_deformable_attention(value, shapes, locations, weights)
    assert out.shape == (b, q, heads * d)

    expected = torch.zeros(b, q, heads, d, dtype=torch.float64)
    starts = [0, shapes[0][0] * shapes[0][1]]
    for bi in range(b):
        for qi in range(q):
            for hi in range(heads):
                for li, (h, w) in enumerate(shapes):
                    level = value[bi, starts[li] : starts[li] + h * w, hi].t().reshape(d, h, w)
                    for pi in range(points):
                        x, y = locations[bi, qi, hi, li, pi].tolist()
                        expected[bi, qi, hi] += weights[bi, qi, hi, li, pi] * _bilinear_direct(level, x, y)
    torch.testing.assert_close(out, expected.reshape(b, q, heads * d), atol=1e-10, rtol=1e-10)


def test_deformable_attention_module_offsets_are_level_pixels():
    """Zero offsets at a pixel centre read that pixel; an offset bias of (+1, 0) reads the
    pixel to its right (x normalised by the width, y by the height: a non-square map)."""
    torch.manual_seed(0)
    dim, h, w = 8, 3, 5
    attn = MultiScaleDeformableAttention(dim, levels=1, heads=2, points=1).double()
    src = torch.randn(1, h * w, dim, dtype=torch.float64)
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    xs, ys = xs.double(), ys.double()
    ref = torch.stack([(xs.flatten() + 0.5) / w, (ys.flatten() + 0.5) / h], -1)
    ref = ref[None, :, None, :]  # (1, S, 1, 2)
    query = torch.randn(1, h * w, dim, dtype=torch.float64)
    projected = attn.output_proj(attn.value_proj(src))  # sampling exactly at a pixel
    with torch.no_grad():
        attn.sampling_offsets.bias.zero_()
    torch.testing.assert_close(attn(query, ref, src, [(h, w)]), projected)
    with torch.no_grad():
        attn.sampling_offsets.bias.copy_(torch.tensor([1.0, 0.0]).repeat(2))
    out = attn(query, ref, src, [(h, w)]).view(h, w, dim)
    right = projected.view(h, w, dim)
    torch.testing.assert_close(out[:, :-1], right[:, 1:])
    # past the right edge: half of the sample (the part beyond the last centre) is zero
    edge = attn.output_proj(torch.zeros(dim, dtype=torch.float64))
    torch.testing.assert_close(out[:, -1], edge.expand(h, dim))


def test_pixel_decoder_and_masked_decoder_shapes():
    torch.manual_seed(0)
    channels = [4, 8, 12, 16]
    feats = [torch.randn(2, c, 32 // s, 48 // s) for c, s in zip(channels, (1, 2, 4, 8), strict=True)]
    pixel = DeformablePixelDecoder(channels, dim=8, mask_dim=6, encoder_layers=2, heads=2,
                                   points=2, ffn_dim=16, norm_groups=2)
    mask_features, multi_scale = pixel(feats)
    assert mask_features.shape == (2, 6, 32, 48)
    assert [tuple(m.shape) for m in multi_scale] == [(2, 8, 4, 6), (2, 8, 8, 12), (2, 8, 16, 24)]
    decoder = MaskedAttentionDecoder(dim=8, num_queries=5, heads=2, ffn_dim=16, layers=4, mask_dim=6)
    outputs = decoder(multi_scale, mask_features)
    assert len(outputs) == 5  # the learnable queries' prediction + one per layer
    for out in outputs:
        assert out["queries"].shape == (2, 5, 8)
        assert out["mask_logits"].shape == (2, 5, 32, 48)
    # the first prediction reads only the learnable queries: the same for both images
    torch.testing.assert_close(outputs[0]["queries"][0], outputs[0]["queries"][1])
    assert not torch.allclose(outputs[-1]["queries"][0], outputs[-1]["queries"][1])


def test_masked_attention_ignores_features_outside_the_mask():
    """A query whose previous mask covers only the left half cannot see the right half of
    the level it cross-attends to: changing the right half leaves that layer's output."""
    torch.manual_seed(0)
    decoder = MaskedAttentionDecoder(dim=8, num_queries=3, heads=2, ffn_dim=16, layers=1,
                                     mask_dim=4, levels=1).eval()
    mask_features = torch.zeros(1, 4, 4, 4)
    mask_features[:, 0, :, :2] = 10.0  # channel 0 is "left half"
    mask_features[:, 0, :, 2:] = -10.0
    with torch.no_grad():
        # every query's mask embedding = +channel 0: all masks are the left half
        last = decoder.mask_embed.layers[-1]
        last.weight.zero_()
        last.bias.copy_(torch.tensor([1.0, 0, 0, 0]))
    level = torch.randn(1, 8, 4, 4)
    changed = level.clone()
    changed[..., 2:] += torch.randn(1, 8, 4, 2) * 5
    a = decoder([level], mask_features)[1]["queries"]
    b = decoder([changed], mask_features)[1]["queries"]
    torch.testing.assert_close(a, b)
    changed_left = level.clone()
    changed_left[..., :2] += 5
    c = decoder([changed_left], mask_features)[1]["queries"]
    assert not torch.allclose(a, c)


# -- the model -----------------------------------------------------------------------------------


def test_gkc_tiny_forward_backward():
    torch.manual_seed(0)
    model = build_model(preset_config("gkc-tiny")).train()
    section = model.config.family_config
    images = torch.rand(2, 3, 64, 96)
    text = model.text(["cat", "sofa, couch", "dog"])
    out = model(images, text, image_sizes=[(64, 96), (50, 70)])
    n, e = section.num_queries, model.embed_dim
    assert out["mask_logits"].shape == (2, n, 16, 24)
    assert out["class_logits"].shape == (2, n, 4)
    assert out["distill_embeddings"].shape == (2, n, e)
    assert len(out["aux"]) == section.dec_layers  # 1 + dec_layers outputs in all
    loss = sum(
        o["class_logits"].logsumexp(-1).mean() + o["mask_logits"].sigmoid().mean() + o["distill_embeddings"].sum()
        for o in [out, *out["aux"]]
    )
    loss.backward()
    trainable = {k: p for k, p in model.named_parameters() if p.requires_grad}
    assert not [k for k in trainable if k.startswith("text_encoder")]  # frozen text
    missing = [k for k, p in trainable.items() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, missing
    assert model.logit_scale.grad.abs() > 0
    # logit scale starts at ln(1/0.07) and is exponentiated
    assert model.logit_scale.item() == pytest.approx(math.log(1 / 0.07))


def test_timm_backbone_option():
    cfg = preset_config("gkc-tiny").replace(
        **{"gkc.backbone": "resnet18", "gkc.backbone_kwargs": {"channels": [8, 16, 32, 64], "stem_width": 8}}
    )
    model = build_model(cfg).eval()
    with torch.no_grad():
        scores = model.predict_scores(torch.rand(1, 3, 64, 64), model.text(["a", "b"]))
    assert scores.shape == (1, 2, 64, 64)
    assert not any(k.startswith("backbone.conv1") for k in model.state_dict())


def test_config_round_trip_and_errors():
    cfg = preset_config("gkc-clip-rn50")
    data = cfg.to_dict()
    assert data["gkc"]["dec_layers"] == 9 and data["gkc"]["num_queries"] == 100
    back = config_from_dict(copy.deepcopy(data))
    assert back.family_config == cfg.family_config and back.to_dict() == data
    bad = copy.deepcopy(data)
    bad["gkc"]["num_querys"] = 5
    with pytest.raises(ConfigError, match="num_querys"):
        config_from_dict(bad)
    bad = preset_config("gkc-tiny").to_dict()
    bad["clip"]["model_cfg"]["vision_cfg"]["layers"] = 2
    with pytest.raises(ValueError, match="clip-resnet"):
        build_model(config_from_dict(bad))


def test_paper_geometry():
    cfg = preset_config("gkc-clip-rn50")
    section: GKCConfig = cfg.family_config
    assert (section.hidden_dim, section.num_queries, section.num_heads) == (256, 100, 8)
    assert (section.dim_feedforward, section.dec_layers, section.dropout) == (2048, 9, 0.0)
    assert section.encoder_layers == 6 and section.backbone == "clip-resnet"
    assert cfg.text.templates == ["{}"]  # bare names, as the paper
    model = build_model(cfg)
    assert len(model.class_proj) == 10 and model.class_proj[0].out_features == 1024
    trunk = sum(p.numel() for p in model.backbone.parameters())
    assert 23e6 < trunk < 24e6  # RN50's trunk; its 14.8M-parameter attention pool is absent


def _forbid_image_towers(monkeypatch):
    import open_clip.model
    import open_clip.modified_resnet

    def refuse(*args, **kwargs):
        raise AssertionError("a CLIP image tower was built")

    monkeypatch.setattr(open_clip.modified_resnet.AttentionPool2d, "__init__", refuse)
    monkeypatch.setattr(open_clip.modified_resnet.ModifiedResNet, "__init__", refuse)
    monkeypatch.setattr(open_clip.model, "_build_vision_tower", refuse)
    monkeypatch.setattr(open_clip.model.CLIP, "__init__", refuse)


def test_no_clip_image_tower_built_saved_or_loaded(tmp_path, monkeypatch, rgb_image):
    import open_clip

    cfg = preset_config("gkc-tiny")
    # the keys a real CLIP ResNet image tower has (built before image towers are forbidden)
    reference = open_clip.CLIP(**{k: v for k, v in cfg.clip.model_cfg.items()})
    visual_keys = set(reference.visual.state_dict())
    trunk_keys = {k for k in visual_keys if not k.startswith("attnpool.")}
    assert trunk_keys != visual_keys

    _forbid_image_towers(monkeypatch)
    seg = Segmenter.from_config("gkc-tiny", seed=0)
    result = seg.segment(rgb_image, ["cat", "dog, puppy"])
    assert result.label_map.shape == rgb_image.shape[:2]
    folder = seg.save_pretrained(tmp_path / "gkc")
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        saved = set(f.keys())
    loaded = Segmenter.from_pretrained(folder)
    loaded.segment(rgb_image, ["cat", "dog, puppy"])
    for keys in (saved, set(loaded.model.state_dict())):
        assert not [k for k in keys if "attnpool" in k or "visual" in k or "clip" in k.split(".")[0]]
        backbone = {k.removeprefix("backbone.") for k in keys if k.startswith("backbone.")}
        assert backbone == trunk_keys


def _convnext_clip_cfgs():
    from onepass_ovs.models.sed import TINY_CONVNEXT_CLIP_CFG
    from onepass_ovs.toy.clip import tiny_convnext_clip_config

    # timm's convnext_atto as is (strides 4..32), and the shapes world's (timm kwargs,
    # patch-2 stem without the first-stage downsample: strides 2..16)
    return [(copy.deepcopy(TINY_CONVNEXT_CLIP_CFG), [16, 8, 4, 2]), (tiny_convnext_clip_config(), [32, 16, 8, 4])]


@torch.no_grad()
@pytest.mark.parametrize("index", [0, 1])
def test_convnext_clip_trunk_loads_and_matches_timm(index):
    """'clip-convnext': the trunk of a timm ConvNeXt CLIP, its last stage equal to timm's
    forward_features, no CLIP head in the model; the text side from the same CLIP."""
    from onepass_ovs.config import ClipConfig
    from onepass_ovs.models.towers import create_clip

    clip_cfg, widths = _convnext_clip_cfgs()[index]
    cfg = preset_config("gkc-tiny")
    cfg.clip = ClipConfig(model_name="tiny-convnext", model_cfg=copy.deepcopy(clip_cfg))
    cfg = cfg.replace(**{"gkc.backbone": "clip-convnext"})
    torch.manual_seed(3)
    clip = create_clip(ClipConfig(model_name="tiny-convnext", model_cfg=copy.deepcopy(clip_cfg))).eval()
    _perturb(clip, seed=4, std=0.05)
    model = build_model(cfg).eval()
    model.load_clip_weights(clip)
    images = torch.randn(2, 3, 64, 64)
    features = model.backbone(images)
    assert [f.shape[-1] for f in features] == widths
    torch.testing.assert_close(features[-1], clip.visual.trunk.forward_features(images))
    trunk_keys = {k for k in clip.visual.trunk.state_dict() if not k.startswith("head.")}
    assert {k.removeprefix("backbone.") for k in model.state_dict() if k.startswith("backbone.")} == trunk_keys
    out = model.predict_scores(images.sigmoid(), model.text(["red circle", "cat"]))
    assert out.dense().shape == (2, 2, 64, 64)
    with pytest.raises(ValueError, match="clip-convnext"):
        build_model(preset_config("gkc-tiny").replace(**{"gkc.backbone": "clip-convnext"}))


@torch.no_grad()
def test_clip_weights_load_and_match_open_clip():
    """The trunk equals open_clip's ModifiedResNet up to layer4; the text side equals
    encode_text of the bare name."""
    import open_clip

    cfg = preset_config("gkc-tiny")
    torch.manual_seed(3)
    clip = open_clip.CLIP(**cfg.clip.model_cfg).eval()
    _perturb(clip, seed=4, std=0.05)
    model = build_model(cfg).eval()
    model.load_clip_weights(clip)
    images = torch.randn(2, 3, 64, 64)
    visual = clip.visual
    x = visual.stem(images)
    expected = []
    for layer in (visual.layer1, visual.layer2, visual.layer3, visual.layer4):
        x = layer(x)
        expected.append(x)
    for ours, theirs in zip(model.backbone(images), expected, strict=True):
        torch.testing.assert_close(ours, theirs)
    tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=cfg.clip.model_cfg["text_cfg"]["context_length"])
    ref = F.normalize(clip.encode_text(tokenizer(["red circle", "cat"])), dim=-1)
    ours = model.text(["red circle", "cat"])
    assert ours.shape == (2, 1, model.embed_dim)
    torch.testing.assert_close(ours[:, 0], ref, atol=1e-5, rtol=1e-5)
    quick = open_clip.CLIP(**{**cfg.clip.model_cfg, "quick_gelu": True})
    with pytest.raises(ValueError, match="QuickGELU"):
        model.load_clip_weights(quick)


@torch.no_grad()
def test_max_over_names(tiny_gkc):
    model = tiny_gkc.model
    _perturb_once(model)
    images = torch.rand(1, 3, 64, 64)
    encoding = model.encode_image(images)
    per_name = model.classify(encoding["embeddings"], model.text(["sofa", "couch", "settee", "cat"]))
    text = model.text(["sofa, couch, settee", "cat"])
    assert text.shape == (2, 3, model.embed_dim)
    # the one-name class is padded with its own name
    torch.testing.assert_close(text[1, 0], text[1, 2])
    logits = model.classify(encoding["embeddings"], text)
    expected = torch.stack(
        [per_name[..., :3].amax(-1), per_name[..., 3], per_name[..., 4]], -1
    )
    torch.testing.assert_close(logits, expected)
    # not the averaged-embedding classifier
    averaged = F.normalize(text[0].mean(0), dim=-1)
    avg_logit = model.logit_scale.exp() * encoding["embeddings"] @ averaged
    assert not torch.allclose(avg_logit, logits[..., 0])
    scores = model.decode_scores(encoding, text).dense()
    torch.testing.assert_close(scores, semantic_scores(encoding["mask_logits"], expected, (64, 64)))
    # a (K, E) text tensor is one name per class
    flat = model.text(["sofa", "cat"])[:, 0]
    torch.testing.assert_close(
        model.classify(encoding["embeddings"], flat), per_name[..., [0, 3, 4]]
    )


_PERTURBED: set[int] = set()


def _perturb_once(model):
    if id(model) not in _PERTURBED:
        _perturb(model.backbone, seed=2, std=0.1)
        _perturb(model.pixel_decoder, seed=3, std=0.1)
        _PERTURBED.add(id(model))


@torch.no_grad()
def test_batch_equals_single(tiny_gkc, rng):
    model = tiny_gkc.model
    _perturb_once(model)
    text = model.text(["red circle", "blue square", "background"])
    images = torch.rand(3, 3, 64, 96)
    sizes = [(64, 96), (64, 70), (40, 96)]
    batch = model.predict_scores(images, text, sizes).dense()
    for i in range(3):
        single = model.predict_scores(images[i : i + 1], text, [sizes[i]]).dense()
        torch.testing.assert_close(batch[i : i + 1], single, atol=1e-5, rtol=1e-5)
    pictures = [(rng.random((50, 70, 3)) * 255).astype(np.uint8) for _ in range(2)]
    listed = tiny_gkc.segment(pictures, ["red circle", "blue square"])
    for picture, result in zip(pictures, listed, strict=True):
        alone = tiny_gkc.segment(picture, ["red circle", "blue square"])
        assert np.array_equal(alone.label_map, result.label_map)


def test_save_load_round_trip_bit_exact(tiny_gkc, tmp_path, rgb_image):
    _perturb_once(tiny_gkc.model)
    folder = tiny_gkc.save_pretrained(tmp_path / "m")
    loaded = Segmenter.from_pretrained(folder)
    assert loaded.config.to_dict() == tiny_gkc.config.to_dict()
    a, b = tiny_gkc.model.state_dict(), loaded.model.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    vocab = ["red circle", "blue square, blue box", "background"]
    # text batches of different composition differ in the last bits: encode alike
    tiny_gkc.model.text_encoder.clear_cache()
    r1 = tiny_gkc.segment(rgb_image, vocab)
    r2 = loaded.segment(rgb_image, vocab)
    assert np.array_equal(r1.label_map, r2.label_map)
    assert np.array_equal(r1.probs, r2.probs)


def test_segmenter_from_config_segments(rgb_image):
    seg = Segmenter.from_config("gkc-tiny", seed=0)
    _perturb(seg.model.backbone, seed=5, std=0.1)
    vocab = ["red circle", "blue square", "background, sky, wall"]
    result = seg.segment(rgb_image, vocab, background="background", unknown_threshold=0.4)
    assert result.label_map.shape == rgb_image.shape[:2]
    assert set(np.unique(result.label_map)) <= {0, 1, 2}
    assert isinstance(seg.model, GKC)


# -- training pieces -----------------------------------------------------------------------------


def _distillation_direct(s, c, t, image_index, a):
    terms = []
    for g in sorted(set(image_index)):
        ids = [i for i, x in enumerate(image_index) if x == g]
        for i in ids:
            for j in ids:
                terms.append((a * a * float(t[i] @ t[j]) - float(s[i] @ c[j])) ** 2)
        for i in ids:
            terms.append(float(((s[i] - c[i]) ** 2).sum()))
    return sum(terms) / len(terms)


def test_distillation_loss_matches_double_loop():
    torch.manual_seed(0)
    r, e = 7, 5
    s = F.normalize(torch.randn(r, e, dtype=torch.float64), dim=-1).requires_grad_()
    c = F.normalize(torch.randn(r, e, dtype=torch.float64), dim=-1)
    t = F.normalize(torch.randn(r, e, dtype=torch.float64), dim=-1)
    image_index = [0, 0, 2, 1, 1, 1, 0]  # unsorted; image 2 has one region
    scale = DistillationScale(1.3).double()
    loss = text_guided_distillation_loss(s, c, t, torch.tensor(image_index), scale())
    expected = _distillation_direct(s.detach(), c, t, image_index, scale.a.item())
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    # one mean over the union, not the sum of two means
    loss.backward()
    assert scale.a.grad is not None and scale.a.grad != 0 and s.grad.abs().sum() > 0
    assert scale.a.item() == pytest.approx(1.3) and DistillationScale().a.item() == 1.0
    # no regions: zero, still differentiable
    empty = text_guided_distillation_loss(
        s[:0], c[:0], t[:0], torch.zeros(0, dtype=torch.long), scale()
    )
    assert empty.item() == 0.0 and empty.requires_grad
    with pytest.raises(ValueError, match="image_index"):
        text_guided_distillation_loss(s, c, t, torch.tensor([0, 1]), scale())


def test_synonym_sampling_threshold_and_redraws():
    names = ["red", "crimson", "scarlet", "maroon", "ruby"]
    probs = [0.5, 0.3, 0.1, 0.05, 0.05]  # 0.1 is not > 0.1
    assert eligible_synonyms(names, probs) == ["red", "crimson"]
    # none above the threshold: the most probable alone
    assert eligible_synonyms(["a", "b", "c"], [0.08, 0.09, 0.07], threshold=0.1) == ["b"]
    rng = random.Random(0)
    regions = [(names, probs), (["circle", "ring", "disc"], [0.34, 0.33, 0.33])]
    loads = [draw_synonyms(regions, rng) for _ in range(600)]
    first = [load[0] for load in loads]
    second = [load[1] for load in loads]
    assert set(first) == {"red", "crimson"}
    assert set(second) == {"circle", "ring", "disc"}
    # uniform among the eligible ones, not by probability (binomial 600, p=1/2: sd ~12)
    assert abs(first.count("red") - 300) < 60
    assert all(abs(second.count(n) - 200) < 50 for n in ("circle", "ring", "disc"))
    # a fresh draw at every load
    assert len({tuple(load) for load in loads[:20]}) > 1
    with pytest.raises(ValueError, match="probabilities"):
        eligible_synonyms(["a"], [0.5, 0.5])


def test_image_vocabulary_renames_then_appends():
    classes = ["red", "blue", "green"]
    vocab, targets = image_vocabulary(classes, [0, 2, 0, 0, 2], ["crimson", "lime", "scarlet", "crimson", "lime"])
    assert vocab == ["crimson", "blue", "lime", "scarlet"]
    assert targets == [0, 2, 3, 0, 2]
    assert [vocab[t] for t in targets] == ["crimson", "lime", "scarlet", "crimson", "lime"]
    with pytest.raises(ValueError, match="outside"):
        image_vocabulary(classes, [3], ["x"])


def test_teacher_region_inputs_grey_outside_box_crop():
    torch.manual_seed(0)
    image = torch.rand(3, 10, 12)
    masks = torch.zeros(2, 10, 12, dtype=torch.bool)
    masks[0, 2:6, 3:7] = True  # a 4 x 4 box
    masks[0, 2, 3] = False  # one pixel of the box outside the mask
    masks[1, 5:9, 1:11] = True  # 4 x 10: resized, aspect not kept
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    crops = teacher_region_inputs(image, masks, size=4, mean=mean, std=std)
    assert crops.shape == (2, 3, 4, 4)
    m = torch.tensor(mean).view(3, 1, 1)
    s = torch.tensor(std).view(3, 1, 1)
    expected = image[:, 2:6, 3:7].clone()
    expected[:, 0, 0] = 128 / 255
    torch.testing.assert_close(crops[0], (expected - m) / s)
    # the second crop is the 4 x 10 box squeezed to 4 x 4 (no grey: the box is all mask)
    squeezed = F.interpolate(image[None, :, 5:9, 1:11], size=(4, 4), mode="bilinear",
                             align_corners=False, antialias=True)[0]
    torch.testing.assert_close(crops[1], (squeezed - m) / s)
    empty = torch.zeros(1, 10, 12, dtype=torch.bool)
    with pytest.raises(ValueError, match="mask 0 is empty"):
        teacher_region_inputs(image, empty)


def test_distillation_over_outputs_uses_the_final_matching_per_output():
    torch.manual_seed(0)
    b, n, e = 2, 5, 4
    outputs = [{"distill_embeddings": F.normalize(torch.randn(b, n, e, dtype=torch.float64), dim=-1)}
               for _ in range(3)]
    indices = [(torch.tensor([1, 3]), torch.tensor([2, 0])), (torch.tensor([4]), torch.tensor([0]))]
    teacher = [F.normalize(torch.randn(3, e, dtype=torch.float64), dim=-1),
               F.normalize(torch.randn(1, e, dtype=torch.float64), dim=-1)]
    text = [F.normalize(torch.randn(3, e, dtype=torch.float64), dim=-1),
            F.normalize(torch.randn(1, e, dtype=torch.float64), dim=-1)]
    a = 0.8
    total = distillation_over_outputs(outputs, indices, teacher, text, torch.tensor(a, dtype=torch.float64))
    expected = 0.0
    for out in outputs:
        emb = out["distill_embeddings"]
        s = [emb[0, 1], emb[0, 3], emb[1, 4]]
        c = [teacher[0][2], teacher[0][0], teacher[1][0]]
        t = [text[0][2], text[0][0], text[1][0]]
        expected += _distillation_direct(s, c, t, [0, 0, 1], a)
    assert total.item() == pytest.approx(expected, rel=1e-12)
