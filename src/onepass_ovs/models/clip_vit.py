"""open_clip ViT image tower run densely, at any grid, with patch severance.

Wraps an open_clip ``VisionTransformer`` (its modules are reused, not copied) and adds:

- bicubic interpolation of CLIP's positional table to any (h, w) patch grid;
- DeOP's learned extra positional tables (input + chosen blocks), zero-initialised so an
  untrained model equals CLIP;
- patch severance in chosen blocks, so each output patch token describes its own place
  instead of a mixture of the whole image:

  ``weighted``    attention output of token l = out_proj(s_l * v_l), s_l = sum_n m_n(l)
                  (DeOP's released default; CLS gets s = N). O(N*L), no token mixing.
  ``identity``    attention matrix = identity: out_proj(v_l) (DeOP's GPS).
  ``mask-guided`` A = softmax over tokens of (m^T m); output A v (DeOP's MPS). Fused kernel
                  in :func:`onepass_ovs.ops.mask_guided_attention`.
  ``clearclip``   query-query attention; the residual and the FFN of the block are removed
                  (training-free recipe).
  ``none``        plain CLIP.

Shapes: images (B, 3, H, W) normalised with CLIP's mean/std, H and W multiples of the
patch size; masks (B, N, h, w) proposal mask *logits* at any resolution.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import mask_guided_attention


def interpolate_positions(table: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Resize a ViT position table (1 + g*g, C) to (1 + h*w, C) bicubically.

    The CLS row is kept as it is. Returns the table itself when sizes already match.
    """
    n = table.shape[0] - 1
    side = int(round(n**0.5))
    if side * side != n:
        raise ValueError(f"position table with {n} patch rows is not a square grid")
    h, w = grid
    if (side, side) == (h, w):
        return table
    cls, patches = table[:1], table[1:]
    patches = patches.reshape(1, side, side, -1).permute(0, 3, 1, 2).float()
    patches = F.interpolate(patches, size=(h, w), mode="bicubic", align_corners=False)
    patches = patches.permute(0, 2, 3, 1).reshape(h * w, -1).to(table.dtype)
    return torch.cat([cls, patches], 0)


class DenseClipViT(nn.Module):
    """CLIP ViT image tower producing one embedding per patch.

    Args:
        visual: open_clip ``VisionTransformer`` (standard blocks with
            ``nn.MultiheadAttention``; no attentional pooler).
        learned_pos_grid: side of DeOP's learned extra tables (0 = none).
        learned_pos_blocks: blocks (>= 1) that get an extra table before attention; the
            input table is always present when ``learned_pos_grid`` > 0.
        severance: one of ``weighted``, ``identity``, ``mask-guided``, ``clearclip``, ``none``.
        severance_blocks: block indices (negative counts from the end) to sever.
    """

    def __init__(
        self,
        visual: nn.Module,
        *,
        learned_pos_grid: int = 0,
        learned_pos_blocks: Sequence[int] = (),
        severance: str = "weighted",
        severance_blocks: Sequence[int] = (-1,),
    ):
        super().__init__()
        if getattr(visual, "attn_pool", None) is not None:
            raise ValueError("CLIP ViTs with an attentional pooler are not supported")
        self.conv1 = visual.conv1
        self.class_embedding = visual.class_embedding
        self.positional_embedding = visual.positional_embedding
        self.ln_pre = visual.ln_pre
        self.blocks = visual.transformer.resblocks
        self.ln_post = visual.ln_post
        self.proj = visual.proj
        self.pool_type = getattr(visual, "pool_type", "tok")
        self.final_ln_after_pool = getattr(visual, "final_ln_after_pool", False)
        self.patch_size = tuple(visual.patch_size)
        self.width = self.conv1.out_channels
        depth = len(self.blocks)
        for block in self.blocks:
            if not isinstance(getattr(block, "attn", None), nn.MultiheadAttention):
                raise ValueError("only open_clip ViT blocks with nn.MultiheadAttention are supported")
        self.num_heads = self.blocks[0].attn.num_heads

        self.severance = severance
        self.severance_blocks = sorted({b % depth for b in severance_blocks})
        self.learned_pos_grid = learned_pos_grid
        if learned_pos_grid > 0:
            rows = 1 + learned_pos_grid * learned_pos_grid
            blocks = sorted(set(learned_pos_blocks))
            if any(not 1 <= b < depth for b in blocks):
                raise ValueError(f"learned_pos_blocks must lie in [1, {depth - 1}]: {blocks}")
            self.learned_pos_block_ids = [0, *blocks]
            # zero init: an untrained model is exactly CLIP
            self.learned_pos = nn.ParameterList(
                [nn.Parameter(torch.zeros(rows, self.width)) for _ in self.learned_pos_block_ids]
            )
        else:
            self.learned_pos_block_ids = []
            self.learned_pos = nn.ParameterList()

    @property
    def output_dim(self) -> int:
        return self.proj.shape[1] if self.proj is not None else self.width

    def grid_size(self, height: int, width: int) -> tuple[int, int]:
        ph, pw = self.patch_size
        if height % ph or width % pw:
            raise ValueError(f"image size {height}x{width} is not a multiple of the patch {ph}x{pw}")
        return height // ph, width // pw

    # -- forward ------------------------------------------------------------------------
    def forward_tokens(
        self, images: torch.Tensor, mask_logits: torch.Tensor | None = None, *, plain: bool = False
    ) -> tuple[torch.Tensor, tuple[int, int]]:
        """Run the transformer. Returns tokens (B, 1 + h*w, width) before ln_post, and (h, w).

        ``mask_logits`` (B, N, *, *) are needed by the ``weighted`` and ``mask-guided``
        severance; without them those blocks run unsevered. ``plain=True`` runs the
        unmodified CLIP (no learned positions, no severance).
        """
        grid = self.grid_size(images.shape[-2], images.shape[-1])
        x = self.conv1(images.to(self.conv1.weight.dtype))  # (B, width, h, w)
        x = x.flatten(2).transpose(1, 2)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1)
        x = x + interpolate_positions(self.positional_embedding, grid).to(x.dtype)
        extra = {} if plain else {
            block: interpolate_positions(table, grid).to(x.dtype)
            for block, table in zip(self.learned_pos_block_ids, self.learned_pos, strict=True)
        }
        if 0 in extra:
            x = x + extra[0]
        x = self.ln_pre(x)

        token_masks = None
        if mask_logits is not None and self.severance in ("weighted", "mask-guided"):
            token_masks = self.token_masks(mask_logits, grid)

        for index, block in enumerate(self.blocks):
            if index in extra and index > 0:
                x = x + extra[index]
            if not plain and index in self.severance_blocks and self.severance != "none":
                x = self.severed_block(block, x, token_masks)
            else:
                x = block(x)
        return x, grid

    @staticmethod
    def token_masks(mask_logits: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Soft masks per token: (B, 1 + h*w, N); the CLS row is all ones.

        DeOP's order for severance: resize the logits to the patch grid, then sigmoid.
        """
        m = F.interpolate(mask_logits.float(), size=grid, mode="bilinear", align_corners=False)
        m = m.sigmoid().flatten(2).transpose(1, 2)  # (B, L, N)
        cls = m.new_ones(m.shape[0], 1, m.shape[2])
        return torch.cat([cls, m], dim=1)

    def severed_block(
        self, block: nn.Module, x: torch.Tensor, token_masks: torch.Tensor | None
    ) -> torch.Tensor:
        """One transformer block with its token mixing replaced. x: (B, T, width)."""
        attn: nn.MultiheadAttention = block.attn
        variant = self.severance
        if variant in ("weighted", "mask-guided") and token_masks is None:
            return block(x)
        y = block.ln_1(x)
        width = self.width
        w_q, w_k, w_v = attn.in_proj_weight.split(width)
        b_q, b_k, b_v = (
            attn.in_proj_bias.split(width) if attn.in_proj_bias is not None else (None,) * 3
        )
        v = F.linear(y, w_v, b_v)  # (B, T, width)
        if variant == "weighted":
            # out_proj(s_l * v_l): a per-token scalar, never a (heads, N, L, d) tensor.
            mixed = v * token_masks.sum(-1, keepdim=True).to(v.dtype)
        elif variant == "identity":
            mixed = v
        elif variant == "mask-guided":
            heads = self.num_heads
            vh = v.unflatten(-1, (heads, -1)).transpose(1, 2)  # (B, heads, T, d)
            mixed = mask_guided_attention(token_masks.to(v.dtype), vh)
            mixed = mixed.transpose(1, 2).flatten(2)
        elif variant == "clearclip":
            heads = self.num_heads
            q = F.linear(y, w_q, b_q).unflatten(-1, (heads, -1)).transpose(1, 2)
            vh = v.unflatten(-1, (heads, -1)).transpose(1, 2)
            mixed = F.scaled_dot_product_attention(q, q, vh).transpose(1, 2).flatten(2)
        else:
            raise ValueError(f"unknown severance {variant!r}")
        out = attn.out_proj(mixed)
        if variant == "clearclip":
            # ClearCLIP: drop the residual and the FFN of the severed block
            return out
        x = x + block.ls_1(out)
        return x + block.ls_2(block.mlp(block.ln_2(x)))

    def project(self, tokens: torch.Tensor) -> torch.Tensor:
        """ln_post + proj on tokens (..., width) -> (..., output_dim)."""
        tokens = self.ln_post(tokens)
        return tokens @ self.proj if self.proj is not None else tokens

    def forward(
        self, images: torch.Tensor, mask_logits: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, tuple[int, int]]:
        """Dense L2-normalised patch embeddings (B, h*w, E) and the grid (h, w)."""
        x, grid = self.forward_tokens(images, mask_logits)
        dense = self.project(x[:, 1:])
        return F.normalize(dense.float(), dim=-1), grid

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Global image embedding (B, E) of the plain CLIP, as open_clip's ``encode_image``."""
        x, _ = self.forward_tokens(images, plain=True)
        if self.final_ln_after_pool:
            pooled = x[:, 1:].mean(1) if self.pool_type == "avg" else x[:, 0]
            pooled = self.ln_post(pooled)
            return pooled @ self.proj if self.proj is not None else pooled
        x = self.ln_post(x)
        pooled = x[:, 1:].mean(1) if self.pool_type == "avg" else x[:, 0]
        return pooled @ self.proj if self.proj is not None else pooled


# -- building open_clip models from configs -------------------------------------------------


def resolve_open_clip_config(model_name: str, model_cfg: dict | None) -> dict:
    """The full open_clip model config: ``model_cfg`` if given, else open_clip's named one."""
    import copy

    if model_cfg:
        return copy.deepcopy(model_cfg)
    import open_clip

    cfg = open_clip.get_model_config(model_name)
    if cfg is None:
        raise ValueError(
            f"open_clip has no model config named {model_name!r}; "
            f"see open_clip.list_models() or pass a full model_cfg"
        )
    return copy.deepcopy(cfg)


def create_open_clip(model_cfg: dict) -> nn.Module:
    """Instantiate an open_clip ``CLIP`` (random weights) from its config dict."""
    import copy

    import open_clip

    cfg = copy.deepcopy(model_cfg)
    text_cfg = cfg.get("text_cfg", {})
    if cfg.pop("custom_text", False) or "hf_model_name" in text_cfg:
        raise ValueError("CLIP models with a Hugging Face text tower are not supported yet")
    cfg.pop("multimodal_cfg", None)
    return open_clip.CLIP(**cfg)


def create_tokenizer(model_cfg: dict):
    """The open_clip tokenizer matching a model config (BPE; no download needed)."""
    from open_clip.tokenizer import SimpleTokenizer

    text_cfg = model_cfg.get("text_cfg", {})
    if "hf_tokenizer_name" in text_cfg:
        raise ValueError("CLIP models with a Hugging Face tokenizer are not supported yet")
    return SimpleTokenizer(context_length=text_cfg.get("context_length", 77))
