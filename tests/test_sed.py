"""SED: dense CLIP parity, per-template text, the decoder against direct formulas, category
early rejection (CER), batching, and the Segmenter round trip."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from onepass_ovs.config import ConfigError
from onepass_ovs.models.registry import build_model, config_from_dict, preset_config
from onepass_ovs.models.sed import SED, SEDConfig, UpStage

VOCAB = [f"class {i}" for i in range(10)] + ["dog, puppy", "sky"]


@pytest.fixture(scope="module")
def tiny_sed() -> SED:
    torch.manual_seed(0)
    return build_model(preset_config("sed-tiny")).eval()


@pytest.fixture(scope="module")
def text(tiny_sed):
    with torch.no_grad():
        return tiny_sed.text(VOCAB)


def _with_top_k(model: SED, top_k: int):
    model.config.family_config.rejection_top_k = top_k
    return model


@pytest.fixture
def images():
    torch.manual_seed(1)
    return torch.rand(2, 3, 64, 96)


# -- building, shapes, gradients -----------------------------------------------------------------


def test_forward_backward_shapes_and_detached_aux(images):
    torch.manual_seed(0)
    model = build_model(preset_config("sed-tiny")).train()
    text = model.text(VOCAB).detach()
    out = model(images, text)
    assert out["logits"].shape == (2, len(VOCAB), 16, 24)
    assert [a.shape for a in out["aux_logits"]] == [
        (2, len(VOCAB), 2, 3), (2, len(VOCAB), 4, 6), (2, len(VOCAB), 8, 12),
    ]
    # the auxiliary heads read detached features: their loss reaches only the heads
    sum(a.sum() for a in out["aux_logits"]).backward(retain_graph=True)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.decoder.aux_heads.parameters())
    assert model.decoder.cost_embed.weight.grad is None
    assert all(p.grad is None for p in model.clip_visual.parameters())
    # the final loss trains the decoder and, through the cost map only, the image tower
    out["logits"].sum().backward()
    assert model.decoder.cost_embed.weight.grad.abs().sum() > 0
    assert model.decoder.stages[2].fuse.layers[0].weight.grad.abs().sum() > 0
    assert model.clip_visual.stem[0].weight.grad.abs().sum() > 0
    # backbone guidance is detached: the guidance convs learn, the trunk gets nothing from it
    assert model.decoder.backbone_guidance[0][0].weight.grad.abs().sum() > 0


def test_decoder_parameter_count_of_sed_b():
    """docs/methods.md and the authors' code: the SED-B decoder has 1.38M parameters."""
    model = build_model(preset_config("sed-convnext-b"))
    count = sum(p.numel() for p in model.decoder.parameters())
    assert abs(count - 1.38e6) < 0.01e6, count
    assert model.num_templates == 80 and model.decoder.cost_embed.in_channels == 80


def test_config_checks_and_round_trip():
    config = preset_config("sed-tiny")
    again = config_from_dict(config.to_dict())
    assert again.family_config == config.family_config
    assert dataclasses.asdict(again.clip) == dataclasses.asdict(config.clip)
    with pytest.raises(ConfigError, match="guidance_dims"):
        config_from_dict({**config.to_dict(), "sed": {"guidance_dims": [8, 8, 64]}})
    with pytest.raises(ConfigError, match="rejection_top_k"):
        SEDConfig(rejection_top_k=-1)


def test_text_shape_is_checked(tiny_sed, images):
    flat = torch.randn(3, 32)
    with pytest.raises(ValueError, match="per-template"):
        tiny_sed.predict_scores(images, flat)


# -- text ------------------------------------------------------------------------------------------


@torch.no_grad()
def test_text_per_template_and_synonyms_averaged(tiny_sed):
    encoder = tiny_sed.text
    templates = encoder.templates
    emb = encoder(["dog, puppy", "sky"])
    assert emb.shape == (2, len(templates), 32)
    # independent reference: each prompt encoded alone, normalised, synonyms averaged per template
    def per_template(name):
        return F.normalize(encoder.encode_prompts([t.format(name) for t in templates]).float(), dim=-1)

    expected = F.normalize((per_template("dog") + per_template("puppy")) / 2, dim=-1)
    torch.testing.assert_close(emb[0], expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(emb[1], per_template("sky"), atol=1e-5, rtol=1e-5)
    # templates are kept apart (not one averaged row)
    assert not torch.allclose(emb[1, 0], emb[1, 1])


# -- dense CLIP embedding --------------------------------------------------------------------------


@torch.no_grad()
def test_dense_embedding_through_head_matches_open_clip_convnext_base():
    """Average the res5 map, apply the head as SED does per pixel: open_clip's encode_image."""
    import open_clip

    from onepass_ovs.config import ClipConfig
    from onepass_ovs.models.towers import build_dense_tower, resolve_open_clip_config

    torch.manual_seed(0)
    clip = open_clip.create_model("convnext_base_w_320", pretrained=None).eval()
    config = ClipConfig(
        model_name="convnext_base_w_320",
        model_cfg=resolve_open_clip_config("convnext_base_w_320", None),
    )
    tower = build_dense_tower(clip.visual, config).eval()
    images = torch.randn(2, 3, 64, 64)
    res5 = tower.stages(images)[-1]
    assert res5.shape == (2, 1024, 2, 2)
    pooled = tower.embed(res5.mean((2, 3), keepdim=True))[:, :, 0, 0]
    torch.testing.assert_close(pooled, clip.encode_image(images), atol=1e-4, rtol=1e-4)
    dense = tower.embed(res5)
    assert dense.shape == (2, 640, 2, 2)


# -- one up-stage against direct formulas -------------------------------------------------------


def _direct_linear_attention(q, k, v, eps=1e-6):
    """q, k, v (L, D) of one head at one pixel: explicit sums over the classes."""
    phi_q, phi_k = F.elu(q) + 1, F.elu(k) + 1
    out = torch.zeros_like(v)
    for i in range(q.shape[0]):
        numerator = torch.zeros(v.shape[1])
        denominator = torch.tensor(0.0)
        for j in range(k.shape[0]):
            weight = (phi_q[i] * phi_k[j]).sum()
            numerator = numerator + weight * v[j]
            denominator = denominator + weight
        out[i] = numerator / (denominator + eps)
    return out


def _direct_stage(stage: UpStage, x, counts, guidance, image_ids, cost_guidance, pool):
    # ConvNeXt block
    block = stage.cnext
    y = F.conv2d(x, block.dwconv.weight, block.dwconv.bias, padding=block.dwconv.padding, groups=x.shape[1])
    y = y.permute(0, 2, 3, 1)
    y = (y - y.mean(-1, keepdim=True)) / torch.sqrt(y.var(-1, unbiased=False, keepdim=True) + 1e-6)
    y = y * block.norm.weight + block.norm.bias
    y = F.gelu(y @ block.fc1.weight.t() + block.fc1.bias) @ block.fc2.weight.t() + block.fc2.bias
    x = x + (block.gamma * y).permute(0, 3, 1, 2)
    # class attention, image by image, pixel by pixel, head by head
    attn = stage.attention
    n, c, h, w = x.shape
    t = F.avg_pool2d(x, pool) if pool > 1 else x.clone()
    out = torch.empty_like(t)
    heads, d = attn.heads, c // attn.heads
    start = 0
    for count in counts:
        rows = slice(start, start + count)
        for i in range(t.shape[2]):
            for j in range(t.shape[3]):
                tokens = t[rows, :, i, j]  # (classes, C)
                normed = F.layer_norm(tokens, (c,), attn.norm1.weight, attn.norm1.bias)
                q, k, v = attn.q(normed), attn.k(normed), attn.v(normed)
                mixed = torch.cat(
                    [
                        _direct_linear_attention(
                            q[:, s * d : (s + 1) * d], k[:, s * d : (s + 1) * d], v[:, s * d : (s + 1) * d]
                        )
                        for s in range(heads)
                    ],
                    dim=1,
                )
                tokens = tokens + mixed
                normed = F.layer_norm(tokens, (c,), attn.norm2.weight, attn.norm2.bias)
                hidden = torch.relu(normed @ attn.mlp[0].weight.t() + attn.mlp[0].bias)
                out[rows, :, i, j] = tokens + hidden @ attn.mlp[2].weight.t() + attn.mlp[2].bias
        start += count
    if pool > 1:
        out = F.interpolate(out, size=(h, w), mode="bilinear", align_corners=True)
    x = x + out
    # upsample, concat guidance, two conv-GN-ReLU
    y = F.conv_transpose2d(x, stage.up.weight, stage.up.bias, stride=2)
    y = torch.cat([y, guidance[image_ids], cost_guidance], dim=1)
    for conv, norm in ((stage.fuse.layers[0], stage.fuse.layers[1]), (stage.fuse.layers[3], stage.fuse.layers[4])):
        y = F.conv2d(y, conv.weight, padding=1)
        y = torch.relu(F.group_norm(y, norm.num_groups, norm.weight, norm.bias, norm.eps))
    return y


@pytest.mark.parametrize("training", [False, True])
@torch.no_grad()
def test_up_stage_matches_direct_implementation(training):
    torch.manual_seed(0)
    cfg = SEDConfig(hidden_dim=32, decoder_dims=(32, 16, 16), guidance_dims=(8, 8, 4), convnext_kernel=3)
    stage = UpStage(32, 32, 8, cfg).train(training)
    for p in stage.parameters():  # move off the init values (layer scale 1, LN 1/0)
        p.add_(torch.randn_like(p) * 0.1)
    counts = [3, 5]  # two images with different numbers of kept classes
    image_ids = torch.tensor([0] * 3 + [1] * 5)
    x = torch.randn(8, 32, 4, 6)
    guidance = torch.randn(2, 8, 8, 12)
    cost_guidance = torch.randn(8, 8, 8, 12)
    got = stage(x, image_ids, guidance, lambda rows: cost_guidance[rows], chunk=3)
    pool = cfg.class_pool_train if training else cfg.class_pool_eval
    expected = _direct_stage(stage, x, counts, guidance, image_ids, cost_guidance, pool)
    assert got.shape == (8, 32, 8, 12)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


# -- category early rejection ------------------------------------------------------------------------


@torch.no_grad()
def test_cer_with_k_at_least_k_equals_no_cer_exactly(tiny_sed, text, images):
    without = _with_top_k(tiny_sed, 0).predict_scores(images, text)
    with_all = _with_top_k(tiny_sed, len(VOCAB)).predict_scores(images, text)
    more = _with_top_k(tiny_sed, 100).predict_scores(images, text)
    assert torch.equal(without, with_all) and torch.equal(without, more)
    assert (without > 0).all()


@torch.no_grad()
def test_cer_rejected_classes_are_zero_and_kept_come_from_top_k(tiny_sed, text, images):
    model = _with_top_k(tiny_sed, 1)
    rows_seen = []
    hook = model.decoder.cost_guidance[2].register_forward_hook(
        lambda module, args, out: rows_seen.append(args[0].shape[0])
    )
    try:
        scores = model.predict_scores(images, text)
    finally:
        hook.remove()
    # the no-CER pass in eval mode gives the first auxiliary head's logits for all classes
    aux0 = model(images, text)["aux_logits"][0]
    for b in range(images.shape[0]):
        kept = (scores[b] > 0).flatten(1).any(1)
        assert 0 < int(kept.sum()) < len(VOCAB)
        # a class is either rejected (exactly zero everywhere) or kept (sigmoid > 0 everywhere)
        assert torch.equal((scores[b] > 0).flatten(1).all(1), kept)
        assert (scores[b][~kept] == 0).all()
        top1 = torch.zeros(len(VOCAB), dtype=torch.bool)
        top1[aux0[b].argmax(0).flatten()] = True
        assert not (kept & ~top1).any(), "a kept class was never any pixel's top-1 before stage 1"
    # the finest cost guidance ran for the finally kept classes only
    assert sum(rows_seen) == int((scores > 0).flatten(2).any(2).sum())


@torch.no_grad()
def test_batch_equals_single_with_cer(tiny_sed, text, images):
    model = _with_top_k(tiny_sed, 2)
    batch = model.predict_scores(images, text, [(64, 96), (64, 80)])
    for b, size in enumerate([(64, 96), (64, 80)]):
        single = model.predict_scores(images[b : b + 1], text, [size])[0]
        assert torch.equal(batch[b] > 0, single > 0)
        torch.testing.assert_close(batch[b], single, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_class_chunking_does_not_change_scores(tiny_sed, text, images):
    _with_top_k(tiny_sed, 0)
    reference = tiny_sed.predict_scores(images, text)
    section = tiny_sed.config.family_config
    old = section.class_chunk
    try:
        section.class_chunk = 5
        chunked = tiny_sed.predict_scores(images, text)
    finally:
        section.class_chunk = old
    torch.testing.assert_close(chunked, reference, atol=1e-6, rtol=1e-5)


# -- Segmenter ------------------------------------------------------------------------------------------


def test_segmenter_segment_and_save_load_round_trip(tmp_path):
    from onepass_ovs import Segmenter

    seg = Segmenter.from_config("sed-tiny", device="cpu", seed=0)
    image = (np.random.default_rng(0).random((45, 61, 3)) * 255).astype(np.uint8)
    vocab = ["cat", "dog, puppy", "sky", "tree"]
    result = seg.segment(image, vocab)
    assert result.label_map.shape == (45, 61)
    assert set(np.unique(result.label_map)) <= set(range(len(vocab)))
    seg.save_pretrained(tmp_path)
    loaded = Segmenter.from_pretrained(tmp_path, device="cpu")
    assert loaded.config.to_dict() == seg.config.to_dict()
    for (key, a), (key_b, b) in zip(
        seg.model.state_dict().items(), loaded.model.state_dict().items(), strict=True
    ):
        assert key == key_b and torch.equal(a, b), key
    batch = torch.rand(1, 3, 64, 96)
    text = seg.encode_text(vocab)
    assert torch.equal(seg.predict_scores(batch, text, [(64, 96)]), loaded.predict_scores(batch, text, [(64, 96)]))
    again = loaded.segment(image, vocab)
    np.testing.assert_array_equal(again.label_map, result.label_map)


# -- training ---------------------------------------------------------------------------------------------


def test_sed_loss_matches_direct_bce():
    from onepass_ovs.data import IGNORE_INDEX
    from onepass_ovs.training.stages.sed import sed_loss

    torch.manual_seed(0)
    logits = torch.randn(2, 3, 4, 4)
    aux = [torch.randn(2, 3, 1, 1), torch.randn(2, 3, 2, 2), torch.randn(2, 3, 4, 4)]
    labels = torch.randint(0, 3, (2, 16, 16))
    labels[0, :4] = IGNORE_INDEX
    out = sed_loss(logits, aux, labels)

    def direct(x):
        up = F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False)
        p = up.sigmoid()
        total = 0.0
        for b in range(2):
            for k in range(3):
                target = ((labels[b] == k) & (labels[b] != IGNORE_INDEX)).float()
                total += -(target * p[b, k].log() + (1 - target) * (1 - p[b, k]).log()).sum()
        return total / (2 * 3 * 16 * 16)

    expected = [direct(logits), *(direct(a) for a in aux)]
    got = [out["loss_final"], out["loss_aux0"], out["loss_aux1"], out["loss_aux2"]]
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["loss"], sum(expected), atol=1e-5, rtol=1e-5)


def test_train_sed_trains_decoder_and_image_tower_only(tmp_path):
    import json

    from onepass_ovs import Segmenter
    from onepass_ovs.data import FolderDataset
    from onepass_ovs.training.augment import SegmentationAugment
    from onepass_ovs.training.stages.sed import sed_default_config, train_sed

    spec = importlib.util.spec_from_file_location(
        "_stage_helpers", Path(__file__).with_name("_stage_helpers.py")
    )
    helpers = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(helpers)
    root = helpers.write_rectangles(tmp_path / "data", n=8)
    dataset = FolderDataset(root, unseen=["yellow box"])
    segmenter = Segmenter.from_config("sed-tiny", device="cpu", seed=0)
    before = {k: v.clone() for k, v in segmenter.model.state_dict().items()}
    config = sed_default_config(
        steps=30, batch_size=4, lr=1e-2, num_workers=0, log_every=1, progress_bar=False,
        checkpoint_every=0, output_dir=str(tmp_path / "run"), grad_clip_norm=None,
    )  # fmt: skip
    assert config.lr_multipliers == {"clip_visual": 0.01}
    trained = train_sed(segmenter, dataset, config, augment=SegmentationAugment(64, short_side=(64, 64)))
    after = trained.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(k.startswith("decoder.") for k in changed)
    assert any(k.startswith("clip_visual.") for k in changed)
    assert not any(k.startswith("text.") for k in changed), "the text tower must stay frozen"
    log = [json.loads(line) for line in (tmp_path / "run" / "training" / "train_log.jsonl").read_text().splitlines()]
    first = sum(e["loss"] for e in log[:5]) / 5
    last = sum(e["loss"] for e in log[-5:]) / 5
    assert last < 0.9 * first, (first, last)  # 30 steps: a sanity check, not a fit
    loaded = Segmenter.from_pretrained(tmp_path / "run", device="cpu")
    for key, value in loaded.model.state_dict().items():
        assert torch.equal(value, after[key]), key
