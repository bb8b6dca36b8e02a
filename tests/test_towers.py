"""The dense CLIP wrapper: parity with open_clip, position interpolation, severance variants."""

from __future__ import annotations

import copy

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
