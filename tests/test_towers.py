"""CLIP towers: parity with open_clip, position interpolation, severance variants, and the
tower kinds (ViT, ViT with a conv stem, timm ConvNeXt)."""

from __future__ import annotations

import copy
import json

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F

from onepass_ovs.config import ClipConfig
from onepass_ovs.models.towers import TINY_CLIP_CFG, DenseViT, create_clip, interpolate_positions


@pytest.fixture(scope="module")
def vit_b16():
    import open_clip

    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-16", pretrained=None).eval()
    return model


@torch.no_grad()
def test_parity_with_open_clip_vit_b16(vit_b16):
    """Severance off, no learned positions: tokens and pooled embedding equal open_clip's."""
    visual = vit_b16.visual
    dense = DenseViT(visual, severance="none").eval()
    images = torch.randn(2, 3, 224, 224)

    visual.output_tokens = True
    try:
        pooled_ref, tokens_ref = visual(images)
    finally:
        visual.output_tokens = False
    tokens, grid = dense.forward_tokens(images)
    assert grid == (14, 14)
    # open_clip's tokens are after ln_post (not projected)
    torch.testing.assert_close(dense.ln_post(tokens[:, 1:]), tokens_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dense.global_embedding(images), vit_b16.encode_image(images), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pooled_ref, vit_b16.encode_image(images), atol=1e-5, rtol=1e-5)


def test_interpolate_positions_identity_and_resize():
    table = torch.randn(1 + 4 * 4, 8)
    assert interpolate_positions(table, (4, 4)) is table
    out = interpolate_positions(table, (6, 3))
    assert out.shape == (1 + 18, 8)
    torch.testing.assert_close(out[0], table[0])
    ref = F.interpolate(
        table[1:].reshape(1, 4, 4, 8).permute(0, 3, 1, 2), size=(6, 3), mode="bicubic", align_corners=False
    )
    torch.testing.assert_close(out[1:], ref.permute(0, 2, 3, 1).reshape(18, 8))


def _tiny_visual(seed=0):
    torch.manual_seed(seed)
    return create_clip(ClipConfig(model_cfg=copy.deepcopy(TINY_CLIP_CFG))).visual.eval()


@torch.no_grad()
def test_learned_positions_start_at_zero_and_change_output():
    visual = _tiny_visual()
    plain = DenseViT(visual, severance="none")
    learned = DenseViT(visual, learned_pos_grid=4, learned_pos_blocks=(1,), severance="none")
    images = torch.randn(1, 3, 96, 64)  # non-square grid 6 x 4
    torch.testing.assert_close(learned(images)[0], plain(images)[0])
    learned.learned_pos[1].add_(torch.randn_like(learned.learned_pos[1]))
    assert not torch.allclose(learned(images)[0], plain(images)[0])


def _dense_severed_block(dense: DenseViT, block, x, token_masks, variant):
    """Direct, slow implementations of each severance formula (explicit attention matrices)."""
    attn = block.attn
    width = dense.width
    heads = dense.num_heads
    d = width // heads
    y = block.ln_1(x)
    w_q, w_k, w_v = attn.in_proj_weight.split(width)
    b_q, b_k, b_v = attn.in_proj_bias.split(width)
    q = (y @ w_q.T + b_q).view(*y.shape[:2], heads, d).transpose(1, 2)
    v = (y @ w_v.T + b_v).view(*y.shape[:2], heads, d).transpose(1, 2)  # (B, h, T, d)
    t = x.shape[1]
    if variant == "weighted":
        # per proposal n: each token attends only to itself with weight m_n(l); summed over n
        n = token_masks.shape[-1]
        per_proposal = torch.stack(
            [torch.diag_embed(token_masks[..., i]) for i in range(n)], 1
        )  # (B, N, T, T)
        attn_matrix = per_proposal.sum(1)[:, None]  # (B, 1, T, T)
        mixed = attn_matrix @ v
    elif variant == "identity":
        mixed = torch.eye(t).expand(1, 1, t, t) @ v
    elif variant == "mask-guided":
        logits = token_masks @ token_masks.transpose(1, 2)  # (B, T, T)
        mixed = logits.softmax(-1)[:, None] @ v
    elif variant == "clearclip":
        logits = q @ q.transpose(-1, -2) / d**0.5
        mixed = logits.softmax(-1) @ v
    out = attn.out_proj(mixed.transpose(1, 2).reshape(*x.shape[:2], width))
    if variant == "clearclip":
        return out
    x = x + out
    return x + block.mlp(block.ln_2(x))


@pytest.mark.parametrize("variant", ["weighted", "identity", "mask-guided", "clearclip"])
@torch.no_grad()
def test_severance_variants_match_dense_formula(variant):
    visual = _tiny_visual(1)
    dense = DenseViT(visual, severance=variant, severance_blocks=(-1,))
    images = torch.randn(2, 3, 64, 48)
    mask_logits = torch.randn(2, 5, 16, 12) * 3
    grid = dense.grid_size(64, 48)
    token_masks = dense.token_masks(mask_logits, grid)
    # tokens before the last block, computed with severance off
    plain = DenseViT(visual, severance="none")
    x = plain.forward_tokens(images)[0]
    # re-run all but the last block by hand
    x0 = images
    x0 = visual.conv1(x0).flatten(2).transpose(1, 2)
    x0 = torch.cat([visual.class_embedding.expand(2, 1, -1), x0], 1)
    x0 = x0 + interpolate_positions(visual.positional_embedding, grid)
    x0 = visual.ln_pre(x0)
    for block in visual.transformer.resblocks[:-1]:
        x0 = block(x0)
    torch.testing.assert_close(visual.transformer.resblocks[-1](x0), x, atol=1e-5, rtol=1e-5)
    expected = _dense_severed_block(dense, visual.transformer.resblocks[-1], x0, token_masks, variant)
    got, _ = dense.forward_tokens(images, mask_logits)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, x, atol=1e-3)


def test_token_masks_order_downsample_then_sigmoid():
    logits = torch.randn(1, 3, 8, 8) * 4
    tm = DenseViT.token_masks(logits, (2, 2))
    assert tm.shape == (1, 5, 3)
    torch.testing.assert_close(tm[:, 0], torch.ones(1, 3))
    expected = F.interpolate(logits, size=(2, 2), mode="bilinear", align_corners=False).sigmoid()
    torch.testing.assert_close(tm[:, 1:], expected.flatten(2).transpose(1, 2))


def test_rejects_sizes_not_multiple_of_patch():
    dense = DenseViT(_tiny_visual(), severance="none")
    with pytest.raises(ValueError, match="multiple of the patch"):
        dense(torch.randn(1, 3, 50, 64))


# -- tower kinds --------------------------------------------------------------------------------


def _conv_stem_config():
    from onepass_ovs.models.registry import preset_config

    cfg = preset_config("clip-tiny")
    cfg.clip.conv_stem = (8, 8, 16, 16)  # patch 16: four stride-2 convs
    return cfg


def test_tower_kinds_are_read_from_the_config():
    from onepass_ovs.models.registry import preset_config
    from onepass_ovs.models.towers import tower_kind

    assert tower_kind(preset_config("clip-tiny").clip) == "vit"
    assert tower_kind(_conv_stem_config().clip) == "vit-conv-stem"
    convnext = ClipConfig(model_name="convnext_base_w_320")
    convnext.model_cfg = open_clip.get_model_config("convnext_base_w_320")
    assert tower_kind(convnext) == "timm-convnext"
    resnet = ClipConfig(model_cfg=open_clip.get_model_config("RN50"))
    with pytest.raises(ValueError, match="no dense adapter"):
        tower_kind(resnet)


def test_conv_stem_replaces_the_patchify_conv_with_the_same_output_grid():
    from onepass_ovs.models.towers import ConvStem

    cfg = _conv_stem_config()
    clip = create_clip(cfg.clip)
    assert isinstance(clip.visual.conv1, ConvStem)
    x = torch.randn(2, 3, 64, 96)
    assert clip.visual.conv1(x).shape == (2, 32, 4, 6)
    with torch.no_grad():  # open_clip's own forward runs through the stem
        assert clip.eval().encode_image(torch.randn(1, 3, 64, 64)).shape == (1, 32)
    with pytest.raises(ValueError, match="log2"):
        ConvStem((8, 8), 32, 16)


def test_conv_stem_can_travel_in_the_open_clip_model_config():
    """An open_clip-style folder (e.g. the shapes world's tiny CLIP) carries its stem as
    model_cfg["conv_stem"]; create_clip and the tower kinds read it from there too."""
    from onepass_ovs.models.towers import ConvStem, conv_stem_of, tower_kind

    carried = ClipConfig(model_name="custom", model_cfg={**TINY_CLIP_CFG, "conv_stem": [8, 8, 16, 16]})
    assert conv_stem_of(carried) == (8, 8, 16, 16)
    assert tower_kind(carried) == "vit-conv-stem"
    model = create_clip(carried)
    assert isinstance(model.visual.conv1, ConvStem)
    assert carried.model_cfg["conv_stem"] == [8, 8, 16, 16]  # the config keeps it
    both = ClipConfig(model_name="custom", model_cfg=dict(carried.model_cfg), conv_stem=(8, 8, 16, 16))
    assert isinstance(create_clip(both).visual.conv1, ConvStem)
    clash = ClipConfig(model_name="custom", model_cfg=dict(carried.model_cfg), conv_stem=(4, 4, 8, 8))
    with pytest.raises(ValueError, match="disagrees"):
        create_clip(clash)
    assert conv_stem_of(ClipConfig(model_name="custom", model_cfg=dict(TINY_CLIP_CFG))) == ()


def test_conv_stem_model_round_trips_and_slides(tmp_path):
    from onepass_ovs import Segmenter

    seg = Segmenter.from_config(_conv_stem_config(), seed=0, device="cpu")
    # give BatchNorm non-trivial statistics, as a trained stem has
    for module in seg.model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    seg.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["clip"]["conv_stem"] == [8, 8, 16, 16]
    loaded = Segmenter.from_pretrained(tmp_path, device="cpu")
    a, b = seg.model.state_dict(), loaded.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any("running_var" in k for k in a)
    image = (np.random.default_rng(0).random((70, 90, 3)) * 255).astype(np.uint8)
    vocab = ["red circle", "background"]
    one = loaded.segment(image, vocab, sliding_window=False)
    np.testing.assert_array_equal(one.label_map, seg.segment(image, vocab, sliding_window=False).label_map)
    # windows smaller than the image: blended tiles, still the full-size map
    slid = loaded.segment(image, vocab, size="original", sliding_window=(48, 32))
    assert slid.label_map.shape == (70, 90)
    fits = loaded.segment(image, vocab, sliding_window=4096)
    np.testing.assert_allclose(fits.probs, one.probs, atol=1e-6)


@torch.no_grad()
def test_convnext_tower_dense_head_matches_encode_image():
    """Averaging the stride-32 map, then the tower's head, is open_clip's encode_image."""
    from onepass_ovs.models.towers import DenseConvNeXt

    cfg = {
        "embed_dim": 32,
        "vision_cfg": {"timm_model_name": "convnext_atto", "timm_model_pretrained": False,
                       "timm_pool": "", "timm_proj": "linear", "image_size": 64},
        "text_cfg": TINY_CLIP_CFG["text_cfg"],
    }
    torch.manual_seed(0)
    clip = create_clip(ClipConfig(model_name="atto", model_cfg=cfg)).eval()
    tower = DenseConvNeXt(clip.visual)
    images = torch.randn(2, 3, 64, 96)
    stages = tower.stages(images)
    assert [s.shape[-1] for s in stages] == [24, 12, 6, 3]
    dense, grid = tower(images)
    assert grid == (2, 3) and dense.shape == (2, 6, 32)
    torch.testing.assert_close(dense.norm(dim=-1), torch.ones(2, 6))
    torch.testing.assert_close(tower.global_embedding(images), clip.encode_image(images),
                               atol=1e-5, rtol=1e-5)
    # per-pixel head: the embedding at one pixel is the head applied to that pixel alone
    res5 = stages[-1]
    pixel = clip.visual.head(clip.visual.trunk.head.norm(res5[:, :, 1:2, 2:3]).flatten(1))
    torch.testing.assert_close(tower.embed(res5)[:, :, 1, 2], pixel, atol=1e-5, rtol=1e-5)


def test_interpolated_positions_are_reused_without_gradients_and_never_stale():
    from onepass_ovs.models import towers

    visual = create_clip(ClipConfig(model_cfg=copy.deepcopy(TINY_CLIP_CFG))).visual.eval()
    dense = DenseViT(visual, learned_pos_grid=4, learned_pos_blocks=(1,))
    images = torch.randn(1, 3, 96, 64)
    calls = []
    original = towers.interpolate_positions

    def counting(table, grid):
        calls.append(grid)
        return original(table, grid)

    towers.interpolate_positions = counting
    try:
        with torch.no_grad():
            first, _ = dense(images)
            assert len(calls) == 3  # CLIP's table + 2 learned tables
            again, _ = dense(images)
            assert len(calls) == 3  # reused
            torch.testing.assert_close(first, again, atol=0, rtol=0)
            dense.learned_pos[0].add_(torch.randn_like(dense.learned_pos[0]))  # an optimiser step
            moved, _ = dense(images)
        assert len(calls) == 4
        assert (moved - first).abs().max() > 1e-3
        with torch.enable_grad():  # training: tables interpolated afresh, gradients flow
            out, _ = dense(images)
            out.sum().backward()
        assert dense.learned_pos[0].grad is not None
    finally:
        towers.interpolate_positions = original
