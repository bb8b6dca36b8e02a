"""DeOP model pieces: CAL heatmap pooling, gates, assembly, classification, full forward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from onepass_ovs import Segmenter
from onepass_ovs.models.anchors import AnchorPooling, mask_average_pool, proposal_gate
from onepass_ovs.models.assembly import semantic_scores
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


def test_semantic_scores_equals_upsample_first():
    masks = torch.randn(2, 5, 6, 7)
    logits = torch.randn(2, 5, 4)  # K = 3 + void
    scores = semantic_scores(masks, logits)
    up = F.interpolate(scores, size=(24, 28), mode="bilinear", align_corners=False)
    masks_up = F.interpolate(masks, size=(24, 28), mode="bilinear", align_corners=False).sigmoid()
    # sigmoid does not commute with resizing: DeOP upsamples the sigmoid maps
    up_masks_sig = F.interpolate(masks.sigmoid(), size=(24, 28), mode="bilinear", align_corners=False)
    direct = torch.einsum("bnk,bnhw->bkhw", logits.softmax(-1)[..., :3], up_masks_sig)
    torch.testing.assert_close(up, direct, atol=1e-5, rtol=1e-5)
    assert masks_up.shape == up_masks_sig.shape


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


@pytest.mark.parametrize("variant", ["weighted", "identity", "mask-guided", "none"])
@torch.no_grad()
def test_every_severance_variant_runs_in_the_model(variant):
    seg = Segmenter.from_config("deop-tiny", seed=0)
    cfg = seg.config.replace(**{"clip.severance": variant})
    seg2 = Segmenter.from_config(cfg, seed=0)
    res = seg2.segment(torch.rand(3, 64, 64), ["a", "b"])
    assert res.label_map.shape == (64, 64)


def test_padding_is_zero_in_normalised_space():
    from onepass_ovs.models.preprocessing import normalise, valid_region

    img = torch.rand(2, 3, 8, 12)
    valid = valid_region([(8, 12), (5, 7)], img.shape, img.device, img.dtype)
    out = normalise(img, (0.5, 0.4, 0.3), (0.2, 0.2, 0.2), valid)
    torch.testing.assert_close(out[0], (img[0] - torch.tensor([0.5, 0.4, 0.3]).view(3, 1, 1)) / 0.2)
    assert out[1, :, 5:].abs().max() == 0 and out[1, :, :, 7:].abs().max() == 0
    assert out[1, :, :5, :7].abs().min() > 0
    assert valid_region([(8, 12)], (1, 3, 8, 12), None, torch.float32) is None
