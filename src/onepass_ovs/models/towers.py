"""CLIP towers: how an open_clip model is built, and how its image tower runs densely.

One adapter per image-tower kind, chosen from the :class:`~onepass_ovs.config.ClipConfig`
(as open_clip's ``_build_vision_tower`` has one branch per kind):

``vit``            open_clip's ``VisionTransformer`` (:class:`DenseViT`);
``vit-conv-stem``  the same ViT with its patchify conv replaced by a small convolutional
                   stem (:class:`ConvStem`; ``ClipConfig.conv_stem``) -- tiny ViTs learn
                   shape far faster with early convolutions;
``timm-convnext``  an open_clip tower built on timm's ConvNeXt (:class:`DenseConvNeXt`):
                   dense last-stage embeddings through the tower's own head, and the
                   stage features (strides 4/8/16/32; 2/4/8/16 with a patch-2 stem)
                   for decoders.

Every adapter's ``forward(images, mask_logits=None)`` returns dense L2-normalised
embeddings (B, h*w, E) and the grid (h, w); ``global_embedding(images)`` equals open_clip's
``encode_image`` (B, E). The ViT adapters add, for DeOP:

- bicubic interpolation of CLIP's positional table to any (h, w) patch grid;
- learned extra positional tables (input + chosen blocks), zero-initialised so an untrained
  model equals CLIP;
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
tower's stride; masks (B, N, h, w) proposal mask *logits* at any resolution.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ClipConfig, TextConfig
from ..ops import mask_guided_attention
from ..text import TextEncoder

# A tiny CLIP for tests: standard open_clip ViT + text tower at toy widths.
TINY_CLIP_CFG: dict = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 32, "patch_size": 16, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


# -- building the open_clip model -------------------------------------------------------------


def resolve_open_clip_config(model_name: str, model_cfg: dict | None) -> dict:
    """The full open_clip model config: ``model_cfg`` if given, else open_clip's named one."""
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


def create_clip(clip: ClipConfig) -> nn.Module:
    """An open_clip ``CLIP`` (random weights) for a ClipConfig, with its conv stem if any.

    Resolves ``clip.model_cfg`` in place from ``clip.model_name`` when empty, so the
    architecture travels with the weights. ``quick_gelu`` in the model config is honoured
    (OpenAI's weights need it).
    """
    import open_clip

    clip.model_cfg = resolve_open_clip_config(clip.model_name, clip.model_cfg)
    cfg = copy.deepcopy(clip.model_cfg)
    stem = conv_stem_of(clip)
    cfg.pop("conv_stem", None)
    text_cfg = cfg.get("text_cfg", {})
    if cfg.pop("custom_text", False) or "hf_model_name" in text_cfg:
        raise ValueError("CLIP models with a Hugging Face text tower are not supported yet")
    cfg.pop("multimodal_cfg", None)
    vision_cfg = cfg.get("vision_cfg", {})
    extensions = _pop_timm_extensions(vision_cfg)
    model = open_clip.CLIP(**cfg)
    _apply_timm_extensions(model.visual, vision_cfg, cfg["embed_dim"], *extensions)
    if stem:
        visual = model.visual
        if not hasattr(visual, "conv1") or not hasattr(visual, "transformer"):
            raise ValueError("conv_stem needs an open_clip ViT image tower")
        patch = visual.patch_size[0]
        visual.conv1 = ConvStem(stem, visual.conv1.out_channels, patch)
    return model


def _pop_timm_extensions(vision_cfg: dict) -> tuple[dict | None, bool]:
    """Remove this library's extensions of a timm ``vision_cfg`` (open_clip does not know
    them) and return them: ``timm_model_kwargs``, ``timm_first_stage_downsample``."""
    return (
        vision_cfg.pop("timm_model_kwargs", None),
        bool(vision_cfg.pop("timm_first_stage_downsample", True)),
    )


def _apply_timm_extensions(
    visual: nn.Module, vision_cfg: dict, embed_dim: int, kwargs: dict | None, first_stage_downsample: bool
) -> None:
    if kwargs:
        _rebuild_timm_tower(visual, vision_cfg, embed_dim, kwargs)
    if not first_stage_downsample:
        _drop_first_stage_downsample(visual)


def create_timm_image_tower(model_cfg: dict) -> nn.Module:
    """The image tower alone (random weights) of a timm CLIP config (``vision_cfg`` with a
    ``timm_model_name``), with this library's extensions applied exactly as
    :func:`create_clip` applies them; no text tower is built."""
    from open_clip.model import _build_vision_tower

    vision_cfg = copy.deepcopy(model_cfg.get("vision_cfg", {}))
    if "timm_model_name" not in vision_cfg:
        raise ValueError("create_timm_image_tower needs vision_cfg.timm_model_name")
    extensions = _pop_timm_extensions(vision_cfg)
    visual = _build_vision_tower(model_cfg["embed_dim"], vision_cfg)
    _apply_timm_extensions(visual, vision_cfg, model_cfg["embed_dim"], *extensions)
    return visual


def _rebuild_timm_tower(visual: nn.Module, vision_cfg: dict, embed_dim: int, kwargs: dict) -> None:
    """Replace an open_clip ``TimmModel``'s trunk by ``timm.create_model(name, **kwargs)``
    and its CLIP head by one of the new trunk's width, as ``TimmModel`` would have built
    them had it forwarded ``kwargs`` (it forwards none; ``vision_cfg["timm_model_kwargs"]``
    is this library's extension, e.g. ``{"dims": [...], "depths": [...], "patch_size": 2}``
    for a small ConvNeXt). Only average/default pooling with a ``linear`` or ``mlp``
    projection is supported, and no pretrained trunk (the kwargs change its shapes)."""
    import timm

    name = vision_cfg.get("timm_model_name")
    pool = vision_cfg.get("timm_pool", "avg")
    proj = vision_cfg.get("timm_proj", "linear")
    if not name or not hasattr(visual, "trunk"):
        raise ValueError("vision_cfg['timm_model_kwargs'] needs a timm image tower (timm_model_name)")
    if not isinstance(kwargs, dict):
        raise ValueError(f"vision_cfg['timm_model_kwargs'] must be a dict, got {kwargs!r}")
    if pool in ("abs_attn", "rot_attn") or proj not in ("linear", "mlp"):
        raise ValueError(
            f"timm_model_kwargs supports timm_pool 'avg'/'' with timm_proj 'linear'/'mlp'; "
            f"got timm_pool={pool!r}, timm_proj={proj!r}"
        )
    if vision_cfg.get("timm_model_pretrained"):
        raise ValueError("timm_model_kwargs reshape the trunk: timm_model_pretrained must be false")
    extra = {}
    if vision_cfg.get("timm_drop_path") is not None:
        extra["drop_path_rate"] = vision_cfg["timm_drop_path"]
    try:
        trunk = timm.create_model(name, pretrained=False, **extra, **kwargs)
    except TypeError as err:
        raise ValueError(f"timm model {name!r} does not accept timm_model_kwargs {kwargs}: {err}") from err
    trunk.reset_classifier(0, **({"global_pool": pool} if pool else {}))
    visual.trunk = trunk
    width = trunk.num_features
    bias = bool(vision_cfg.get("timm_proj_bias", False))
    if proj == "linear":
        visual.head.proj = nn.Linear(width, embed_dim, bias=bias)
    else:
        from timm.layers import Mlp

        drop = float(vision_cfg.get("timm_drop", 0.0))
        visual.head.mlp = Mlp(width, 2 * embed_dim, embed_dim, drop=(drop, 0.0), bias=(True, bias))


def _drop_first_stage_downsample(visual: nn.Module) -> None:
    """Remove the 2x downsampling at the first stage of a timm ConvNeXt trunk.

    timm adds it whenever the stem's stride is 2 (``patch_size=2``), so a patch-2 stem
    alone still gives strides 4/8/16/32; without it the stages run at 2/4/8/16 (a cost
    map at stride 16). ``vision_cfg["timm_first_stage_downsample"] = False`` (this
    library's extension) asks for it; the trunk's ``feature_info`` is updated to match.
    """
    trunk = getattr(visual, "trunk", None)
    stages = getattr(trunk, "stages", None)
    downsample = getattr(stages[0], "downsample", None) if stages is not None else None
    convs = [m for m in downsample.modules() if isinstance(m, nn.Conv2d)] if downsample is not None else []
    if len(convs) != 1 or convs[0].stride != (2, 2) or convs[0].in_channels != convs[0].out_channels:
        raise ValueError(
            "timm_first_stage_downsample=false needs a timm ConvNeXt trunk whose first stage "
            "downsamples by 2 without changing width (a patch_size=2 stem)"
        )
    stages[0].downsample = nn.Identity()
    for info in trunk.feature_info:
        info["reduction"] = int(info["reduction"]) // 2


def conv_stem_of(clip: ClipConfig) -> tuple[int, ...]:
    """The conv stem's channel widths: ``clip.conv_stem``, or a ``"conv_stem"`` entry of
    ``clip.model_cfg`` (how an open_clip-style folder, e.g. the shapes world's tiny CLIP,
    carries its stem). Empty: open_clip's patchify conv. Both set and different: error."""
    own = tuple(int(c) for c in clip.conv_stem or ())
    carried = tuple(int(c) for c in (clip.model_cfg or {}).get("conv_stem") or ())
    if own and carried and own != carried:
        raise ValueError(
            f"clip.conv_stem {list(own)} disagrees with model_cfg['conv_stem'] {list(carried)}"
        )
    return own or carried


class ConvStem(nn.Module):
    """Convolutional stem in place of a ViT's patchify conv (Xiao et al. 2021).

    ``len(channels)`` 3x3 stride-2 convs with BatchNorm + ReLU, then a 1x1 conv to the ViT
    width: (B, 3, H, W) -> (B, width, H / p, W / p) with p = 2 ** len(channels), the same
    output as the patchify conv it replaces.

    BatchNorm normalises with its stored statistics even in train mode (``train()`` keeps
    it in eval mode), so a CLIP frozen or fine-tuned at small batches inside a segmenter
    keeps the statistics of its pretraining. Set ``batch_statistics = True`` for the
    CLIP's own pretraining (batch statistics, running averages updated).
    """

    def __init__(self, channels: Sequence[int], width: int, patch: int):
        super().__init__()
        channels = [int(c) for c in channels]
        if 2 ** len(channels) != patch:
            raise ValueError(
                f"a conv stem for patch {patch} needs log2({patch}) stride-2 convs; "
                f"got {len(channels)} channel widths {channels}"
            )
        layers: list[nn.Module] = []
        cin = 3
        for cout in channels:
            layers += [
                nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True),
            ]
            cin = cout
        self.convs = nn.Sequential(*layers)
        self.proj = nn.Conv2d(cin, width, 1)
        self.out_channels = width
        self.batch_statistics = False

    def train(self, mode: bool = True):
        super().train(mode)
        if not self.batch_statistics:
            for module in self.convs:
                if isinstance(module, nn.BatchNorm2d):
                    module.eval()
        return self

    @property
    def weight(self) -> torch.Tensor:
        """The first conv's weight (callers read its dtype, as of a patchify conv)."""
        return self.convs[0].weight

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.proj(self.convs(images))


def load_open_clip_weights(clip_model: nn.Module, path) -> None:
    """Load an open_clip checkpoint into ``clip_model``: safetensors only (never unpickled)."""
    from open_clip.factory import load_checkpoint

    if str(path).rsplit(".", 1)[-1] != "safetensors":  # open_clip would torch.load anything else
        raise ValueError(f"refusing to load {path}: only .safetensors weights are loaded")
    try:
        load_checkpoint(clip_model, str(path), strict=True)
    except (RuntimeError, KeyError) as err:
        raise ValueError(f"weights {path} do not fit their open_clip model config: {err}") from err


def create_tokenizer(model_cfg: dict):
    """The open_clip tokenizer matching a model config (BPE; no download needed)."""
    from open_clip.tokenizer import SimpleTokenizer

    text_cfg = model_cfg.get("text_cfg", {})
    if "hf_tokenizer_name" in text_cfg:
        raise ValueError("CLIP models with a Hugging Face tokenizer are not supported yet")
    return SimpleTokenizer(context_length=text_cfg.get("context_length", 77))


def build_text_tower(clip_model: nn.Module, clip: ClipConfig, text: TextConfig) -> TextEncoder:
    """The text side of every family: open_clip's text tower (shared, not copied), its
    tokenizer, the config's templates and learned prompt context."""
    return TextEncoder(
        clip_model,
        create_tokenizer(clip.model_cfg),
        templates=text.templates,
        prompt_length=text.prompt_length,
    )


# -- position tables ----------------------------------------------------------------------------


def interpolate_positions(table: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Resize a ViT position table (1 + g*g, C) to (1 + h*w, C) bicubically.

    The CLS row is kept as it is. Returns the table itself when sizes already match.
    """
    n = int(table.shape[0]) - 1  # int(): a constant when traced for ONNX export
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


# -- ViT (patchify or conv stem) ------------------------------------------------------------------


class DenseViT(nn.Module):
    """open_clip ViT image tower producing one embedding per patch.

    Args:
        visual: open_clip ``VisionTransformer`` (standard blocks with
            ``nn.MultiheadAttention``; no attentional pooler); its ``conv1`` may be a
            :class:`ConvStem`.
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
        severance: str = "none",
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

    @property
    def stride(self) -> int:
        return self.patch_size[0]

    @property
    def reads_masks(self) -> bool:
        """True when the severance variant reads proposal masks."""
        return self.severance in ("weighted", "mask-guided")

    def grid_size(self, height: int, width: int) -> tuple[int, int]:
        ph, pw = self.patch_size
        if height % ph or width % pw:
            raise ValueError(f"image size {height}x{width} is not a multiple of the patch {ph}x{pw}")
        return height // ph, width // pw

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
        x = x + self._positions(self.positional_embedding, grid, x.dtype)
        extra = {} if plain else {
            block: self._positions(table, grid, x.dtype)
            for block, table in zip(self.learned_pos_block_ids, self.learned_pos, strict=True)
        }
        if 0 in extra:
            x = x + extra[0]
        x = self.ln_pre(x)

        token_masks = None
        if mask_logits is not None and self.reads_masks:
            token_masks = self.token_masks(mask_logits, grid)

        for index, block in enumerate(self.blocks):
            if index in extra and index > 0:
                x = x + extra[index]
            if not plain and index in self.severance_blocks and self.severance != "none":
                x = self.severed_block(block, x, token_masks)
            else:
                x = block(x)
        return x, grid

    def _apply(self, fn, *args, **kwargs):
        # moving or casting the module replaces its tables: forget their resized copies
        self.__dict__.pop("_position_cache", None)
        return super()._apply(fn, *args, **kwargs)

    def _positions(self, table: torch.Tensor, grid: tuple[int, int], dtype) -> torch.Tensor:
        """``interpolate_positions(table, grid)`` in ``dtype``, remembered per grid when no
        gradient flows: bicubic resizing of 7 tables was a quarter of DeOP's GPU time per
        batch (profiled on an H200). The key holds the table's version counter, so an
        in-place update (an optimiser step) is never served a stale table."""
        if torch.is_grad_enabled() and table.requires_grad:
            return interpolate_positions(table, grid).to(dtype)
        key = (id(table), table._version, grid, table.device, dtype)
        cache = self.__dict__.setdefault("_position_cache", {})
        if key not in cache:
            if len(cache) >= 64:
                cache.clear()
            cache[key] = interpolate_positions(table.detach(), grid).to(dtype)
        return cache[key]

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
        w_q, _, w_v = attn.in_proj_weight.split(width)
        b_q, _, b_v = (
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

    def global_embedding(self, images: torch.Tensor) -> torch.Tensor:
        """Global image embedding (B, E) of the plain CLIP, as open_clip's ``encode_image``."""
        x, _ = self.forward_tokens(images, plain=True)
        if self.final_ln_after_pool:
            pooled = x[:, 1:].mean(1) if self.pool_type == "avg" else x[:, 0]
            pooled = self.ln_post(pooled)
            return pooled @ self.proj if self.proj is not None else pooled
        x = self.ln_post(x)
        pooled = x[:, 1:].mean(1) if self.pool_type == "avg" else x[:, 0]
        return pooled @ self.proj if self.proj is not None else pooled


# -- timm ConvNeXt ---------------------------------------------------------------------------------


class DenseConvNeXt(nn.Module):
    """An open_clip image tower built on timm's ConvNeXt, run densely.

    open_clip's ``encode_image`` is: trunk stages -> global average pool -> the trunk
    head's LayerNorm -> the CLIP head (Linear, or MLP for ConvNeXt-L). Applying the
    LayerNorm and the CLIP head to every last-stage pixel (stride 32, or 16 with a patch-2
    stem) instead of the pooled vector gives
    a dense CLIP embedding per pixel (SED's cost-map features).

    ``stages(images)`` -> the four stage outputs (B, C_i, H/s, W/s), s in ``stage_strides``
    (4, 8, 16, 32; 2, 4, 8, 16 with a patch-2 stem);
    ``embed(res5)`` (B, C, h, w) -> (B, E, h, w) unnormalised; ``forward(images)`` -> dense
    normalised (B, h*w, E) and (h, w).
    """

    def __init__(self, visual: nn.Module):
        super().__init__()
        trunk = visual.trunk
        if not hasattr(trunk, "stages") or not hasattr(trunk, "stem"):
            raise ValueError(f"{type(trunk).__name__} is not a timm ConvNeXt trunk")
        self.stem = trunk.stem
        self.trunk_stages = trunk.stages
        self.norm_pre = getattr(trunk, "norm_pre", nn.Identity())
        self.head_norm = trunk.head.norm
        self.head = visual.head  # CLIP projection: Linear or Mlp
        # fc2 is a Linear, or a 1x1 Conv2d in timm's conv_mlp variants (atto ... nano)
        self.stage_channels = [
            getattr(fc2, "out_features", None) or fc2.out_channels
            for fc2 in (stage.blocks[-1].mlp.fc2 for stage in trunk.stages)
        ]
        self.output_dim = _head_dim(self.head)
        # each stage's stride: the stem's, doubled by every downsampling stage after it
        self.stage_strides = [int(info["reduction"]) for info in trunk.feature_info]

    @property
    def stride(self) -> int:
        """The last stage's stride (32 for standard ConvNeXts, 16 with a patch-2 stem)."""
        return self.stage_strides[-1]

    @property
    def reads_masks(self) -> bool:
        return False

    def grid_size(self, height: int, width: int) -> tuple[int, int]:
        stride = self.stride
        if height % stride or width % stride:
            raise ValueError(f"image size {height}x{width} is not a multiple of {stride}")
        return height // stride, width // stride

    def stages(self, images: torch.Tensor) -> list[torch.Tensor]:
        """(B, 3, H, W) -> [res2, res3, res4, res5] at ``stage_strides`` (4, 8, 16, 32
        for standard ConvNeXts)."""
        x = self.stem(images.to(next(self.stem.parameters()).dtype))
        out = []
        for stage in self.trunk_stages:
            x = stage(x)
            out.append(x)
        out[-1] = self.norm_pre(out[-1])
        return out

    def embed(self, res5: torch.Tensor) -> torch.Tensor:
        """The CLIP head on every pixel: (B, C, h, w) -> (B, E, h, w), not normalised."""
        x = self.head_norm(res5)  # LayerNorm2d over channels, per pixel
        return self.head(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    def forward(
        self, images: torch.Tensor, mask_logits: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, tuple[int, int]]:
        grid = self.grid_size(images.shape[-2], images.shape[-1])
        dense = self.embed(self.stages(images)[-1])
        return F.normalize(dense.flatten(2).transpose(1, 2).float(), dim=-1), grid

    def global_embedding(self, images: torch.Tensor) -> torch.Tensor:
        """open_clip's ``encode_image``: pool, LayerNorm, head -> (B, E)."""
        pooled = self.stages(images)[-1].mean((2, 3), keepdim=True)
        return self.head(self.head_norm(pooled).flatten(1))


def _head_dim(head: nn.Module) -> int:
    last = [m for m in head.modules() if isinstance(m, nn.Linear)][-1]
    return last.out_features


# -- tower kinds ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TowerKind:
    """An image-tower adapter: ``matches(clip_config)`` selects it, ``build(visual,
    clip_config)`` wraps an open_clip image tower densely."""

    name: str
    matches: Callable[[ClipConfig], bool]
    build: Callable[[nn.Module, ClipConfig], nn.Module]


_TOWER_KINDS: list[TowerKind] = []


def register_tower_kind(kind: TowerKind) -> TowerKind:
    _TOWER_KINDS.append(kind)
    return kind


def tower_kind(clip: ClipConfig) -> str:
    """The name of the adapter that runs this CLIP's image tower."""
    return _find_kind(clip).name


def _find_kind(clip: ClipConfig) -> TowerKind:
    for kind in _TOWER_KINDS:
        if kind.matches(clip):
            return kind
    vision = clip.model_cfg.get("vision_cfg", {})
    what = vision.get("timm_model_name") or ("ResNet" if isinstance(vision.get("layers"), list) else "?")
    raise ValueError(
        f"no dense adapter for the CLIP image tower of {clip.model_name!r} ({what}); "
        f"supported kinds: {[k.name for k in _TOWER_KINDS]}"
    )


def build_dense_tower(visual: nn.Module, clip: ClipConfig) -> nn.Module:
    """Wrap an open_clip image tower (``clip_model.visual``) with its kind's adapter."""
    return _find_kind(clip).build(visual, clip)


def _vision(clip: ClipConfig) -> dict:
    return clip.model_cfg.get("vision_cfg", {})


def _is_open_clip_vit(clip: ClipConfig) -> bool:
    vision = _vision(clip)
    return (
        not vision.get("timm_model_name")
        and not isinstance(vision.get("layers"), (list, tuple))
        and not vision.get("attentional_pool")
    )


def _build_vit(visual: nn.Module, clip: ClipConfig) -> DenseViT:
    return DenseViT(
        visual,
        learned_pos_grid=clip.learned_pos_grid,
        learned_pos_blocks=clip.learned_pos_blocks,
        severance=clip.severance,
        severance_blocks=clip.severance_blocks,
    )


def _build_convnext(visual: nn.Module, clip: ClipConfig) -> DenseConvNeXt:
    if clip.severance != "none" or clip.learned_pos_grid:
        raise ValueError(
            "a ConvNeXt image tower has no tokens to sever or positions to learn: set "
            "clip.severance='none' and clip.learned_pos_grid=0"
        )
    return DenseConvNeXt(visual)


register_tower_kind(
    TowerKind("vit", lambda c: _is_open_clip_vit(c) and not conv_stem_of(c), _build_vit)
)
register_tower_kind(
    TowerKind("vit-conv-stem", lambda c: _is_open_clip_vit(c) and bool(conv_stem_of(c)), _build_vit)
)
register_tower_kind(
    TowerKind(
        "timm-convnext",
        lambda c: str(_vision(c).get("timm_model_name", "")).startswith("convnext"),
        _build_convnext,
    )
)


def check_activation_matches(ours: nn.Module, theirs: nn.Module) -> None:
    """Raise if two open_clip models use different MLP activations (GELU vs QuickGELU):
    weights trained with one give subtly wrong features through the other."""

    def activation(model: nn.Module) -> str:
        for module in model.modules():
            name = type(module).__name__
            if name in ("QuickGELU", "GELU"):
                return name
        return "?"

    a, b = activation(ours), activation(theirs)
    if a != b:
        raise ValueError(
            f"the CLIP weights come from a model with {b} but this model's config builds "
            f"{a}: set clip.model_cfg['quick_gelu'] = {b == 'QuickGELU'} (OpenAI's weights "
            "use QuickGELU)"
        )

