"""DeOP model pieces: CAL heatmap pooling, gates, assembly, classification, full forward."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from onepass_ovs import Segmenter
from onepass_ovs.models.anchors import AnchorPooling, mask_average_pool, proposal_gate
from onepass_ovs.models.assembly import AssembledScores, semantic_scores
from onepass_ovs.models.layers import sine_position_embedding


def test_proposal_gate_sigmoid_then_resize():
    logits = torch.randn(2, 3, 8, 8) * 5
    gate = proposal_gate(logits, (4, 4))
    expected = F.interpolate(logits.sigmoid(), size=(4, 4), mode="bilinear", align_corners=False)
    torch.testing.assert_close(gate, expected.flatten(2))


@torch.no_grad()
def test_cal_heatmap_pooling_formula():
    torch.manual_seed(0)
    dim, heads, n = 16, 4, 3
    cal = AnchorPooling(dim, n, num_heads=heads, dim_feedforward=8, dropout=0.0).eval()
    dense = F.normalize(torch.randn(2, 12, dim), dim=-1)
    mask_logits = torch.randn(2, n, 6, 8)
    grid = (3, 4)
    got = cal(dense, grid, mask_logits)

    # independent computation of the same steps
    pos = sine_position_embedding(*grid, dim)
    qpos = cal.query_pos.weight.expand(2, -1, -1)
    anchors = cal.decoder(torch.zeros_like(qpos), dense, qpos, pos)
    q = anchors + qpos
    anchors = cal.out_norm(anchors + cal.out_attn(q, q, anchors)[0])
    qh = cal.q_proj(anchors + qpos).view(2, n, heads, -1)
    kh = cal.k_proj(dense + pos).view(2, 12, heads, -1)
    gate = F.interpolate(mask_logits.sigmoid(), size=grid, mode="bilinear", align_corners=False).flatten(2)
    pooled = []
    d = dim // heads
    for h in range(heads):
        att = (qh[:, :, h] @ kh[:, :, h].transpose(1, 2) / d**0.5).softmax(-1)  # (B, N, L)
        heat = att * gate  # not renormalised
        pooled.append(heat @ dense[..., h * d : (h + 1) * d])
    expected = F.normalize(torch.cat(pooled, -1), dim=-1)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_mask_average_pool():
    dense = torch.randn(1, 4, 3)
    gate = torch.tensor([[[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 2.0]]])
    out = mask_average_pool(dense, gate)
    torch.testing.assert_close(out[0, 0], F.normalize(dense[0, :2].mean(0), dim=-1))
    torch.testing.assert_close(out[0, 1], F.normalize(dense[0, 3], dim=-1))


def test_assembly_upsamples_logits_before_the_sigmoid():
    """DeOP's order: sum_n p_n[c] * sigmoid(up(M_n)) at the input size (as training's loss)."""
    torch.manual_seed(0)
    masks = torch.randn(2, 5, 6, 7) * 4
    logits = torch.randn(2, 5, 4)  # K = 3 + void
    canvas = (24, 28)
    up = F.interpolate(masks, size=canvas, mode="bilinear", align_corners=False).sigmoid()
    expected = torch.einsum("bnk,bnhw->bkhw", logits.softmax(-1)[..., :3], up)
    lazy = AssembledScores(masks, logits, canvas)
    assert lazy.shape == (2, 3, *canvas)
    torch.testing.assert_close(lazy.dense(), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(semantic_scores(masks, logits, canvas), expected)
    rows = torch.tensor([3, 0, 23, 3])
    torch.testing.assert_close(lazy.rows(rows), expected[:, :, rows], atol=1e-5, rtol=1e-5)
    # the other order (sigmoid at mask resolution, then resize) is measurably different
    other = F.interpolate(semantic_scores(masks, logits), size=canvas, mode="bilinear",
                          align_corners=False)
    assert (other - expected).abs().max() > 0.05
    # class-side operations are exact because assembly is linear in the probabilities
    torch.testing.assert_close(lazy.select(1, 3).dense(), expected[:, 1:3], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lazy.class_sum().dense(), expected.sum(1, keepdim=True),
                               atol=1e-5, rtol=1e-5)
    merged = lazy.merge_classes(0, 2).dense()
    torch.testing.assert_close(merged[:, 0], expected[:, 1:].sum(1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(merged[:, 1], expected[:, 0], atol=1e-5, rtol=1e-5)


def test_segment_label_map_follows_the_authors_assembly():
    """The label map equals argmax of the direct formula: up(M) to the padded input,
    sigmoid, assemble, crop the valid region, resize to the original size."""
    from onepass_ovs.images import prepare, to_tensor

    seg = Segmenter.from_config("deop-tiny", seed=0)
    with torch.no_grad():  # confident masks, as a trained model has: the orders then differ
        seg.model.proposals.mask_embed.layers[-1].weight.mul_(100)
    rng = torch.Generator().manual_seed(1)
    image = torch.rand(3, 45, 61, generator=rng)
    vocab = ["a", "b", "c"]
    res = seg.segment(image, vocab)
    canvas, geometry = prepare(to_tensor(image)[0], seg.config.preprocess)
    with torch.no_grad():
        model = seg.model
        out = model(canvas[None], model.text(vocab), [geometry.resized])
        sem = semantic_scores(out["mask_logits"], out["class_logits"], geometry.padded)
    h1, w1 = geometry.resized
    sem = F.interpolate(sem[..., :h1, :w1], size=geometry.original, mode="bilinear",
                        align_corners=False)[0]
    expected = sem.argmax(0).numpy()
    # ties aside (float rounding), every pixel agrees
    assert (res.label_map == expected).mean() > 0.999
    # the result's normalisation (a tiny epsilon where every mask is off)
    probs = ((sem + 1e-8) / (sem.sum(0, keepdim=True) + 3e-8)).numpy()
    assert abs(res.probs - probs).max() < 1e-4
    # sigmoid at the mask resolution, then resizing, is far off on the same model
    low = semantic_scores(out["mask_logits"], out["class_logits"])
    low = F.interpolate(low, size=geometry.padded, mode="bilinear", align_corners=False)
    low = F.interpolate(low[..., :h1, :w1], size=geometry.original, mode="bilinear",
                        align_corners=False)[0]
    assert abs(((low + 1e-8) / (low.sum(0, keepdim=True) + 3e-8)).numpy() - probs).max() > 0.05


def test_cal_attention_dropout_acts_in_training_only():
    torch.manual_seed(0)
    dim, heads, n = 16, 4, 3
    cal = AnchorPooling(dim, n, num_heads=heads, dim_feedforward=8, dropout=0.5)
    dense = F.normalize(torch.randn(2, 12, dim), dim=-1)
    mask_logits = torch.randn(2, n, 6, 8)
    cal.eval()
    with torch.no_grad():
        a, b = cal(dense, (3, 4), mask_logits), cal(dense, (3, 4), mask_logits)
    torch.testing.assert_close(a, b)
    cal.train()
    torch.manual_seed(1)
    with torch.no_grad():
        c = cal(dense, (3, 4), mask_logits)
    # reproduce the training pass with the same random stream: decoder dropouts first,
    # then one dropout mask on the pooling attention, between the softmax and the gate
    torch.manual_seed(1)
    with torch.no_grad():
        pos = sine_position_embedding(3, 4, dim)
        qpos = cal.query_pos.weight.expand(2, -1, -1)
        anchors = cal.decoder(torch.zeros_like(qpos), dense, qpos, pos)
        q = anchors + qpos
        anchors = cal.out_norm(anchors + cal.dropout(cal.out_attn(q, q, anchors)[0]))
        qh = cal.q_proj(anchors + qpos).unflatten(-1, (heads, -1)).transpose(1, 2)
        kh = cal.k_proj(dense + pos).unflatten(-1, (heads, -1)).transpose(1, 2)
        attention = (qh @ kh.transpose(-1, -2) / (dim // heads) ** 0.5).softmax(-1)
        attention = F.dropout(attention, 0.5, training=True)
        gate = proposal_gate(mask_logits, (3, 4))
        pooled = (attention * gate[:, None]) @ dense.unflatten(-1, (heads, -1)).transpose(1, 2)
        expected = F.normalize(pooled.transpose(1, 2).flatten(2), dim=-1)
    torch.testing.assert_close(c, expected, atol=1e-5, rtol=1e-5)
    assert (c - a).abs().max() > 1e-3  # dropout changed the training output


def test_quick_gelu_from_the_preset_and_checked_on_load():
    from onepass_ovs.config import ClipConfig
    from onepass_ovs.models.registry import preset_config
    from onepass_ovs.models.towers import TINY_CLIP_CFG, create_clip

    assert preset_config("deop-vit-b16").clip.model_cfg["quick_gelu"] is True
    seg = Segmenter.from_config("deop-tiny", seed=0)  # plain GELU
    quick = create_clip(ClipConfig(model_cfg={**TINY_CLIP_CFG, "quick_gelu": True}))
    with pytest.raises(ValueError, match="QuickGELU"):
        seg.model.load_clip_weights(quick)
    plain = create_clip(ClipConfig(model_cfg=dict(TINY_CLIP_CFG)))
    seg.model.load_clip_weights(plain)
    torch.testing.assert_close(
        seg.model.clip_visual.conv1.weight, plain.visual.conv1.weight, atol=0, rtol=0
    )


def test_classify_appends_void_last(tiny_segmenter):
    model = tiny_segmenter.model
    pooled = F.normalize(torch.randn(1, 2, model.embed_dim), dim=-1)
    text = F.normalize(torch.randn(3, model.embed_dim), dim=-1)
    logits = model.classify(pooled, text)
    assert logits.shape == (1, 2, 4)
    void = F.normalize(model.void_embedding, dim=-1)
    torch.testing.assert_close(logits[..., -1], 100 * pooled @ void[0])
    torch.testing.assert_close(logits[..., :3], 100 * pooled @ text.T)


@torch.no_grad()
def test_full_size_deop_vit_b16_forward_shapes():
    seg = Segmenter.from_config("deop-vit-b16", seed=0)
    model = seg.model
    assert model.proposals.config.num_queries == 100
    assert model.clip_visual.severance_blocks == [11]
    assert len(model.proposals.layers) == 6
    assert model.proposals.backbone.conv1[0].out_channels == 64  # deep stem 64-64-128
    assert model.proposals.backbone.conv1[-1].out_channels == 128
    text = F.normalize(torch.randn(5, 512), dim=-1)
    out = model(torch.rand(1, 3, 128, 160), text)
    assert out["mask_logits"].shape == (1, 100, 32, 40)
    assert out["class_logits"].shape == (1, 100, 6)
    assert out["pooled"].shape == (1, 100, 512)
    torch.testing.assert_close(out["pooled"].norm(dim=-1), torch.ones(1, 100))


@torch.no_grad()
def test_every_severance_variant_reaches_the_tower():
    """Each variant is built into the model and changes its pooled features; 'none' equals
    the plain CLIP pass."""
    images = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    base = Segmenter.from_config("deop-tiny", seed=0).config
    pooled = {}
    for variant in ("weighted", "identity", "mask-guided", "none"):
        model = Segmenter.from_config(base.replace(**{"clip.severance": variant}), seed=0).model
        assert model.clip_visual.severance == variant
        out = model.encode_image(images)
        pooled[variant] = out["pooled"]
        if variant == "none":
            x = (images - torch.tensor(base.preprocess.clip_mean).view(1, 3, 1, 1)) / torch.tensor(
                base.preprocess.clip_std).view(1, 3, 1, 1)
            tokens, _ = model.clip_visual.forward_tokens(x)
            plain, _ = model.clip_visual.forward_tokens(x, plain=True)
            torch.testing.assert_close(tokens, plain)  # zero-initialised learned positions
    names = list(pooled)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert (pooled[a] - pooled[b]).abs().max() > 1e-4, (a, b)


def test_padding_is_zero_in_normalised_space():
    from onepass_ovs.models.preprocessing import normalise, valid_region

    img = torch.rand(2, 3, 8, 12)
    valid = valid_region([(8, 12), (5, 7)], img.shape, img.device, img.dtype)
    out = normalise(img, (0.5, 0.4, 0.3), (0.2, 0.2, 0.2), valid)
    torch.testing.assert_close(out[0], (img[0] - torch.tensor([0.5, 0.4, 0.3]).view(3, 1, 1)) / 0.2)
    assert out[1, :, 5:].abs().max() == 0 and out[1, :, :, 7:].abs().max() == 0
    assert out[1, :, :5, :7].abs().min() > 0
    assert valid_region([(8, 12)], (1, 3, 8, 12), None, torch.float32) is None


def test_label_map_pruning_of_assembled_scores_is_exact():
    """Large vocabularies: only classes whose bound can win in a band are assembled at full
    resolution; the label map equals the argmax over all classes."""
    seg = Segmenter.from_config("deop-tiny", seed=0)
    with torch.no_grad():
        seg.model.proposals.mask_embed.layers[-1].weight.mul_(30)
    vocab = [f"class {i}" for i in range(300)]
    image = torch.rand(3, 70, 90, generator=torch.Generator().manual_seed(2))
    res = seg.segment(image, vocab)
    probs = res.probs  # every class, no pruning
    top2 = np.sort(probs, axis=0)[-2:]
    clear = (top2[1] - top2[0]) > 1e-6
    assert clear.mean() > 0.9
    np.testing.assert_array_equal(res.label_map[clear], probs.argmax(0)[clear])


def test_label_map_paths_for_few_and_many_candidates_agree(monkeypatch):
    """The pruned label map and every class scored at every pixel agree."""
    import onepass_ovs.result as result_module

    seg = Segmenter.from_config("deop-tiny", seed=0)
    with torch.no_grad():
        seg.model.proposals.mask_embed.layers[-1].weight.mul_(30)
    vocab = [f"class {i}" for i in range(120)]
    image = torch.rand(3, 50, 70, generator=torch.Generator().manual_seed(3))
    wide = seg.segment(image, vocab).label_map
    monkeypatch.setattr(result_module, "_ASSEMBLED_DENSE_CLASSES", 10**9)
    grouped = seg.segment(image, vocab)
    np.testing.assert_array_equal(grouped.label_map, wide)
    probs = grouped.probs
    top2 = np.sort(probs, axis=0)[-2:]
    clear = (top2[1] - top2[0]) > 1e-6
    np.testing.assert_array_equal(wide[clear], probs.argmax(0)[clear])
