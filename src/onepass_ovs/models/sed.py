"""SED: a ConvNeXt CLIP cost map refined by a gradual-fusion decoder, with category early
rejection (Xie et al., CVPR 2024; docs/methods.md section 3).

Data flow for images (B, 3, H, W) in [0, 1], H and W multiples of 32, and K classes:

1. the CLIP ConvNeXt image tower (``DenseConvNeXt``) -> res2..res5 at strides 4/8/16/32;
   every res5 pixel goes through the tower's own head (LayerNorm, then the projection)
   -> dense embeddings F (B, E, h, w), h = H/32, L2-normalised;
2. text: every class name embedded with each of the P prompt templates separately
   (P = 80 ImageNet templates for the real presets), synonyms "a, b" averaged per template
   and renormalised -> T (K, P, E) (:class:`TemplateTextEncoder`);
3. cost map: per-template cosine C[b, k, p] = <F_b, T_kp>, no temperature, held only at
   stride 32 as rows (B*K, P, h, w) (classes folded into the batch);
4. decoder (:class:`SEDDecoder`): a 7x7 conv P -> 128, then three up-stages
   (:class:`UpStage`: ConvNeXt block, linear class attention across the classes at each
   pixel, 2x ConvTranspose, concat backbone guidance from res4/res3/res2 and cost guidance
   from the raw cost map through a ConvTranspose chain, two conv3x3-GN-ReLU) with widths
   128 -> 64 -> 32 -> 16, and a 3x3 head -> one logit per class at stride 4;
5. category early rejection (CER, ``SEDConfig.rejection_top_k``): before each up-stage an
   auxiliary head scores every class at every pixel; per image, only the classes in some
   pixel's top k continue (nested stage to stage); rejected classes get probability 0.

Output: sigmoid probabilities (B, K, H/4, W/4) on the padded canvas.

Differences from the authors' code, all deliberate:

- preprocessing: the paper squashes every image to a fixed 768 x 768 square; like the other
  families, this library resizes the short side (768 for the real presets, the scale the
  square gives on the short side) and zero-pads to a multiple of 32, so aspect ratios are
  kept;
- CER selects the kept classes per image (the authors take the union over the batch and
  support batch 1 only), so an image's scores do not depend on what it is batched with;
- the decoder never holds anything at stride 16 or finer for all classes at once unless
  it must: the per-class parts of a stage (ConvNeXt block, upsampling, guidance, convs,
  head) run in chunks of ``SEDConfig.class_chunk`` classes, and the cost-map guidance is
  computed per chunk, for kept classes only (the authors compute the whole chain for all K:
  about 1.75 GB in fp32 at K = 847). The numbers are the same.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ClipConfig, ConfigError, ModelConfig, PreprocessConfig, TextConfig
from ..text import TextEncoder
from .preprocessing import normalise, valid_region
from .registry import register_family, register_preset
from .towers import (
    TINY_CLIP_CFG,
    DenseConvNeXt,
    build_dense_tower,
    check_activation_matches,
    create_clip,
    create_tokenizer,
    resolve_open_clip_config,
    tower_kind,
)

# LayerNorms of the decoder (ConvNeXt blocks, class attention) use the authors' epsilon.
_LN_EPS = 1e-6
# GroupNorm in the fusion convs: one group per 16 channels, as in the reference.
_GROUP_WIDTH = 16


@dataclass
class SEDConfig:
    """SED's own section of the model config (``"sed"`` in config.json).

    ``hidden_dim`` is the width after the first conv on the cost map (128); the three
    up-stages take ``hidden_dim``, ``decoder_dims[0]``, ``decoder_dims[1]`` channels in and
    give ``decoder_dims[i]`` out; ``guidance_dims[i]`` is the width G of both the backbone
    guidance and the cost guidance of stage i (the stage upsamples to Cin - G channels and
    concatenates 2G). ``class_pool_train`` / ``class_pool_eval``: the average-pooling size
    before class attention in training (2) and at inference (1: no pooling).
    ``rejection_top_k``: category early rejection keeps, per image, the classes in any
    pixel's top k before each stage (0 = off). ``class_chunk``: classes processed together
    in the per-class parts (memory only, no effect on the numbers).
    """

    hidden_dim: int = 128
    decoder_dims: tuple[int, ...] = (64, 32, 16)
    guidance_dims: tuple[int, ...] = (32, 16, 8)
    num_heads: int = 4
    cost_kernel: int = 7
    convnext_kernel: int = 9
    layer_scale_init: float = 1.0
    class_pool_train: int = 2
    class_pool_eval: int = 1
    rejection_top_k: int = 8
    class_chunk: int = 64

    def __post_init__(self) -> None:
        if len(self.decoder_dims) != 3 or len(self.guidance_dims) != 3:
            raise ConfigError(
                f"sed.decoder_dims and sed.guidance_dims need 3 entries (one per up-stage), "
                f"got {list(self.decoder_dims)} and {list(self.guidance_dims)}"
            )
        inputs = (self.hidden_dim, *self.decoder_dims[:2])
        for i, (cin, cout, g) in enumerate(
            zip(inputs, self.decoder_dims, self.guidance_dims, strict=True)
        ):
            if not 0 < g < cin:
                raise ConfigError(
                    f"sed.guidance_dims[{i}] = {g} must lie in [1, {cin - 1}] (stage {i} "
                    f"upsamples its {cin} channels to {cin} - G)"
                )
            if cout % _GROUP_WIDTH:
                raise ConfigError(
                    f"sed.decoder_dims[{i}] = {cout} must be a multiple of {_GROUP_WIDTH} "
                    "(GroupNorm with one group per 16 channels)"
                )
            if cin % self.num_heads:
                raise ConfigError(
                    f"stage {i} width {cin} is not divisible by sed.num_heads = {self.num_heads}"
                )
        for name in ("cost_kernel", "convnext_kernel"):
            if getattr(self, name) % 2 == 0 or getattr(self, name) < 1:
                raise ConfigError(f"sed.{name} must be odd and positive, got {getattr(self, name)}")
        for name in ("class_pool_train", "class_pool_eval", "class_chunk"):
            if getattr(self, name) < 1:
                raise ConfigError(f"sed.{name} must be >= 1, got {getattr(self, name)}")
        if self.rejection_top_k < 0:
            raise ConfigError(f"sed.rejection_top_k must be >= 0 (0 = off), got {self.rejection_top_k}")


# -- text: templates kept apart -----------------------------------------------------------


class TemplateTextEncoder(TextEncoder):
    """A :class:`~onepass_ovs.text.TextEncoder` whose class embeddings keep the templates
    apart: ``forward(vocabulary)`` -> (K, P, E), each template's embedding L2-normalised.

    An entry "a, b" embeds each synonym with every template, averages the synonyms per
    template and renormalises (the inherited ``forward`` does exactly that on (P, E) rows).
    Each name is encoded once and cached, as in the base class.
    """

    def encode_names(self, names: Sequence[str]) -> torch.Tensor:
        """(len(names), P, E) per-template normalised embeddings."""
        templates = self.templates
        prompts = [t.format(name) for name in names for t in templates]
        chunks = [
            self.encode_prompts(prompts[start : start + self.encode_batch_size])
            for start in range(0, len(prompts), self.encode_batch_size)
        ]
        emb = F.normalize(torch.cat(chunks).float(), dim=-1)
        return emb.view(len(names), len(templates), -1)


# -- decoder parts ----------------------------------------------------------------------------


def _chunked(fn: Callable[[slice], torch.Tensor], total: int, chunk: int) -> torch.Tensor:
    """``cat([fn(rows) for rows in chunks of range(total)])`` along dim 0."""
    if total <= chunk:
        return fn(slice(0, total))
    return torch.cat([fn(slice(s, min(s + chunk, total))) for s in range(0, total, chunk)])


class ConvNeXtBlock(nn.Module):
    """ConvNeXt block on (N, C, h, w): depthwise k x k conv, LayerNorm (eps 1e-6), Linear
    C -> 4C, GELU, Linear 4C -> C, layer scale, residual."""

    def __init__(self, dim: int, kernel: int, layer_scale_init: float):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel, padding=kernel // 2, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=_LN_EPS)
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), float(layer_scale_init)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dwconv(x).permute(0, 2, 3, 1)
        y = self.fc2(F.gelu(self.fc1(self.norm(y))))
        return x + (self.gamma * y).permute(0, 3, 1, 2)


def linear_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float = 1e-6
) -> torch.Tensor:
    """Linear attention ("Transformers are RNNs") with the elu + 1 feature map phi.

    q, k, v: (N, L, H, D) -> (N, L, H, D), out_l = phi(q_l) . sum_s phi(k_s) v_s^T /
    (phi(q_l) . sum_s phi(k_s) + eps). The values are divided by L before the sum and the
    result multiplied back (keeps half precision from overflowing; same value).
    """
    q = F.elu(q) + 1
    k = F.elu(k) + 1
    length = v.shape[1]
    kv = torch.einsum("nshd,nshv->nhdv", k, v / length)
    z = 1 / (torch.einsum("nlhd,nhd->nlh", q, k.sum(1)) + eps)
    return torch.einsum("nlhd,nhdv->nlhv", q, kv) * (z * length).unsqueeze(-1)


class ClassAttention(nn.Module):
    """Attention across the classes at each pixel, one image at a time.

    Rows x (N, C, h, w) hold the classes of several images, each image's rows contiguous
    (``rows_per_image``). t = avgpool_p(x); per pixel, the classes are the tokens:
    t += LinAttn(LN t), t += MLP(LN t); t is resized back to h x w (bilinear, corners
    aligned) and out = x + t. At p = 1 (inference) t starts as x itself, so out = 2x +
    attn + mlp, as in the reference. LinAttn: q, k, v Linear C -> C with bias, ``heads``
    heads, elu + 1, no output projection; MLP C -> 4C, ReLU, -> C.
    """

    def __init__(self, dim: int, heads: int, pool_train: int, pool_eval: int):
        super().__init__()
        self.heads = heads
        self.pool_train = pool_train
        self.pool_eval = pool_eval
        self.norm1 = nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.ReLU(), nn.Linear(4 * dim, dim))

    @property
    def pool(self) -> int:
        return self.pool_train if self.training else self.pool_eval

    def attend(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (pixels, classes, C) -> the same after the attention and MLP residuals."""
        y = self.norm1(tokens)
        q, k, v = (proj(y).unflatten(-1, (self.heads, -1)) for proj in (self.q, self.k, self.v))
        tokens = tokens + linear_attention(q, k, v).flatten(2)
        return tokens + self.mlp(self.norm2(tokens))

    def forward(self, x: torch.Tensor, rows_per_image: Sequence[int]) -> torch.Tensor:
        p = self.pool
        t = F.avg_pool2d(x, p) if p > 1 else x
        outs = []
        for rows in t.split(list(rows_per_image)):
            n, c, h, w = rows.shape
            tokens = rows.permute(2, 3, 0, 1).reshape(h * w, n, c)
            outs.append(self.attend(tokens).reshape(h, w, n, c).permute(2, 3, 0, 1))
        t = torch.cat(outs)
        if p > 1:
            t = F.interpolate(t, size=x.shape[-2:], mode="bilinear", align_corners=True)
        return x + t


class FusionConvs(nn.Module):
    """2 x [conv3x3 (no bias), GroupNorm (C/16 groups), ReLU]: (N, Cin, H, W) -> (N, Cout, H, W)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        groups = cout // _GROUP_WIDTH
        self.layers = nn.Sequential(
            nn.Conv2d(cin, cout, 3, padding=1, bias=False),
            nn.GroupNorm(groups, cout),
            nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False),
            nn.GroupNorm(groups, cout),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class UpStage(nn.Module):
    """One gradual-fusion stage: (N, Cin, h, w) class rows -> (N, Cout, 2h, 2w).

    ConvNeXt block and class attention at h x w; ConvTranspose 2x2/s2 Cin -> Cin - G;
    concat the image's backbone guidance (G channels, shared by its classes) and the
    class's cost guidance (G channels); two conv3x3-GN-ReLU -> Cout.
    """

    def __init__(self, cin: int, cout: int, guidance: int, cfg: SEDConfig):
        super().__init__()
        self.cnext = ConvNeXtBlock(cin, cfg.convnext_kernel, cfg.layer_scale_init)
        self.attention = ClassAttention(cin, cfg.num_heads, cfg.class_pool_train, cfg.class_pool_eval)
        self.up = nn.ConvTranspose2d(cin, cin - guidance, 2, stride=2)
        self.fuse = FusionConvs(cin + guidance, cout)

    def forward(
        self,
        x: torch.Tensor,
        image_ids: torch.Tensor,
        backbone_guidance: torch.Tensor,
        cost_guidance: Callable[[slice], torch.Tensor],
        chunk: int,
        head: nn.Module | None = None,
    ) -> torch.Tensor:
        """x (N, Cin, h, w) rows, image-major; image_ids (N,); backbone_guidance
        (B, G, 2h, 2w) per image; ``cost_guidance(rows)`` -> (n, G, 2h, 2w) for a slice of
        the rows. ``head`` (applied per chunk when given, so the stage output is never held
        for all rows) -> (N, 1, 2h, 2w)."""
        n = x.shape[0]
        x = _chunked(lambda rows: self.cnext(x[rows]), n, chunk)
        x = self.attention(x, torch.bincount(image_ids).tolist())

        def tail(rows: slice) -> torch.Tensor:
            y = torch.cat(
                [
                    self.up(x[rows]),
                    backbone_guidance.index_select(0, image_ids[rows]).to(x.dtype),
                    cost_guidance(rows).to(x.dtype),
                ],
                dim=1,
            )
            y = self.fuse(y)
            return head(y) if head is not None else y

        return _chunked(tail, n, chunk)


class SEDDecoder(nn.Module):
    """Cost map -> per-class logits at stride 4, with optional category early rejection.

    Args:
        num_templates: P, the cost map's channels (80 for the real presets).
        backbone_channels: channels of res4, res3, res2 (the guidance of stages 0, 1, 2).
        cfg: the family section.
    """

    def __init__(self, num_templates: int, backbone_channels: Sequence[int], cfg: SEDConfig):
        super().__init__()
        self.cfg = cfg
        self.num_templates = num_templates
        widths = (cfg.hidden_dim, *cfg.decoder_dims)
        self.cost_embed = nn.Conv2d(
            num_templates, cfg.hidden_dim, cfg.cost_kernel, padding=cfg.cost_kernel // 2
        )
        self.backbone_guidance = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, g, 3, padding=1), nn.ReLU())
            for c, g in zip(backbone_channels, cfg.guidance_dims, strict=True)
        )
        chain_in = (num_templates, *cfg.guidance_dims[:2])
        self.cost_guidance = nn.ModuleList(
            nn.Sequential(nn.ConvTranspose2d(c, g, 2, stride=2), nn.ReLU())
            for c, g in zip(chain_in, cfg.guidance_dims, strict=True)
        )
        self.stages = nn.ModuleList(
            UpStage(widths[i], widths[i + 1], cfg.guidance_dims[i], cfg) for i in range(3)
        )
        self.aux_heads = nn.ModuleList(nn.Conv2d(widths[i], 1, 3, padding=1) for i in range(3))
        self.head = nn.Conv2d(widths[3], 1, 3, padding=1)

    def project_guidance(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """[res4, res3, res2] (detached by the caller) -> per-image guidance
        [(B, G0, 2h, 2w), (B, G1, 4h, 4w), (B, G2, 8h, 8w)]."""
        return [proj(f) for proj, f in zip(self.backbone_guidance, features, strict=True)]

    def cost_map(self, embedding: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """embedding (B, E, h, w), text (K, P, E), both normalised -> cosine rows
        (B*K, P, h, w), image-major (row b*K + k), computed per image and class chunk."""
        text = text.to(embedding.dtype)
        chunk = self.cfg.class_chunk
        rows = []
        for image in embedding:
            for start in range(0, text.shape[0], chunk):
                rows.append(torch.einsum("ehw,kpe->kphw", image, text[start : start + chunk]))
        return torch.cat(rows)

    def guidance_at(self, cost: torch.Tensor, stage: int) -> torch.Tensor:
        """Cost guidance of ``stage`` for cost rows (n, P, h, w): the ConvTranspose chain
        up to that stage -> (n, G_stage, 2^(stage+1) h, ...)."""
        x = cost
        for level in range(stage + 1):
            x = self.cost_guidance[level](x)
        return x

    @staticmethod
    def reject(aux: torch.Tensor, image_ids: torch.Tensor, top_k: int) -> torch.Tensor:
        """Category early rejection: aux logits (N, h, w) of image-major rows -> keep (N,)
        bool, True for the rows (classes) of each image that are in some pixel's top k."""
        keep = torch.zeros(aux.shape[0], dtype=torch.bool, device=aux.device)
        start = 0
        for count in torch.bincount(image_ids).tolist():
            scores = aux[start : start + count]
            top = scores.topk(min(top_k, count), dim=0).indices.flatten()
            keep[start + top] = True
            start += count
        return keep

    def forward(
        self,
        embedding: torch.Tensor,
        text: torch.Tensor,
        guidance: Sequence[torch.Tensor],
        top_k: int = 0,
    ) -> dict:
        """embedding (B, E, h, w), text (K, P, E), guidance from :meth:`project_guidance`.

        Returns a dict of rows: ``logits`` (N, 8h, 8w) final logits at stride 4
        with ``image_ids`` / ``class_ids`` (N,) naming each row's image and class, and
        ``aux`` a list of three (logits (N_i, h_i, w_i), image_ids, class_ids) for the
        auxiliary heads before each stage. Without rejection (``top_k`` 0) every (image,
        class) pair is a row, image-major: N = B*K.
        """
        if text.ndim != 3 or text.shape[1] != self.num_templates:
            raise ValueError(
                f"SED needs per-template text embeddings (K, {self.num_templates}, E) from "
                f"model.text(vocabulary); got shape {tuple(text.shape)}"
            )
        if text.shape[-1] != embedding.shape[1]:
            raise ValueError(
                f"text embeddings have {text.shape[-1]} dims, the image embeddings {embedding.shape[1]}"
            )
        batch, classes = embedding.shape[0], text.shape[0]
        chunk = self.cfg.class_chunk
        device = embedding.device
        image_ids = torch.arange(batch, device=device).repeat_interleave(classes)
        class_ids = torch.arange(classes, device=device).repeat(batch)
        cost = self.cost_map(embedding, text).to(self.cost_embed.weight.dtype)
        x = _chunked(lambda rows: self.cost_embed(cost[rows]), cost.shape[0], chunk)
        aux_out = []
        for index, stage in enumerate(self.stages):
            # auxiliary heads read detached features: their loss trains only the heads
            aux_in = x.detach() if self.training else x
            aux_head = self.aux_heads[index]
            aux = _chunked(
                lambda rows, head=aux_head, feats=aux_in: head(feats[rows]), x.shape[0], chunk
            )[:, 0]
            aux_out.append((aux, image_ids, class_ids))
            if top_k > 0:
                keep = self.reject(aux, image_ids, top_k)
                if not bool(keep.all()):
                    kept = keep.nonzero()[:, 0]
                    x, cost = x[kept], cost[kept]
                    image_ids, class_ids = image_ids[kept], class_ids[kept]
            current_cost = cost
            x = stage(
                x,
                image_ids,
                guidance[index],
                lambda rows, level=index, c=current_cost: self.guidance_at(c[rows], level),
                chunk,
                head=self.head if index == len(self.stages) - 1 else None,
            )
        return {"logits": x[:, 0], "image_ids": image_ids, "class_ids": class_ids, "aux": aux_out}


def scatter_rows(
    values: torch.Tensor, image_ids: torch.Tensor, class_ids: torch.Tensor, batch: int, classes: int
) -> torch.Tensor:
    """Rows (N, h, w) of (image, class) pairs -> (batch, classes, h, w), zero elsewhere."""
    out = values.new_zeros(batch, classes, *values.shape[1:])
    out[image_ids, class_ids] = values
    return out


# -- the model ------------------------------------------------------------------------------


class SED(nn.Module):
    """The SED model. Build with ``SED(config)`` (random init) and load weights into it.

    State dict: ``clip_visual.*`` (the ConvNeXt image tower and its head), ``text.*``
    (open_clip's text tower, frozen in training) and ``decoder.*``.
    """

    family = "sed"

    def __init__(self, config: ModelConfig, clip_model: nn.Module | None = None):
        super().__init__()
        self.config = config
        if clip_model is None:
            clip_model = create_clip(config.clip)  # resolves config.clip.model_cfg
        kind = tower_kind(config.clip)
        if kind != "timm-convnext":
            raise ValueError(
                f"SED needs a ConvNeXt CLIP image tower (open_clip timm ConvNeXt); "
                f"{config.clip.model_name!r} has a {kind!r} tower"
            )
        self.clip_visual: DenseConvNeXt = build_dense_tower(clip_model.visual, config.clip)
        self.text = TemplateTextEncoder(
            clip_model,
            create_tokenizer(config.clip.model_cfg),
            templates=config.text.templates,
            prompt_length=config.text.prompt_length,
        )
        section: SEDConfig = config.family_config
        res2, res3, res4, _ = self.clip_visual.stage_channels
        self.decoder = SEDDecoder(len(self.text.templates), (res4, res3, res2), section)

    @property
    def embed_dim(self) -> int:
        return self.clip_visual.output_dim

    @property
    def num_templates(self) -> int:
        return len(self.text.templates)

    def encode_image(self, images: torch.Tensor, image_sizes=None) -> dict[str, torch.Tensor]:
        """The vocabulary-independent pass. images (B, 3, H, W) in [0, 1], zero-padded,
        H and W multiples of 32; image_sizes: the valid (h, w) of each image.

        Returns ``embedding`` (B, E, H/32, W/32) normalised dense CLIP embeddings and
        ``guidance_0..2`` (B, G_i, H/16, ...), (.., H/8, ..), (.., H/4, ..): the projected
        backbone guidance (res4, res3, res2 detached: CLIP gets gradient only through the
        cost map).
        """
        pre = self.config.preprocess
        self.clip_visual.grid_size(images.shape[-2], images.shape[-1])  # checks the size
        valid = valid_region(image_sizes, images.shape, images.device, images.dtype)
        x = normalise(images, pre.clip_mean, pre.clip_std, valid)
        res2, res3, res4, res5 = self.clip_visual.stages(x)
        embedding = F.normalize(self.clip_visual.embed(res5), dim=1)
        guidance = self.decoder.project_guidance([res4.detach(), res3.detach(), res2.detach()])
        out = {"embedding": embedding}
        out.update({f"guidance_{i}": g for i, g in enumerate(guidance)})
        return out

    def _decode(self, encoding: dict, text_embeddings: torch.Tensor, top_k: int) -> dict:
        guidance = [encoding[f"guidance_{i}"] for i in range(3)]
        return self.decoder(encoding["embedding"], text_embeddings, guidance, top_k)

    def decode_scores(self, encoding: dict, text_embeddings: torch.Tensor) -> torch.Tensor:
        """Class probabilities (B, K, H/4, W/4): sigmoid of the final logits; with category
        early rejection (``rejection_top_k`` > 0, inference only) rejected classes are 0."""
        top_k = 0 if self.training else self.config.family_config.rejection_top_k
        out = self._decode(encoding, text_embeddings, top_k)
        batch, classes = encoding["embedding"].shape[0], text_embeddings.shape[0]
        return scatter_rows(
            out["logits"].sigmoid(), out["image_ids"], out["class_ids"], batch, classes
        )

    def predict_scores(self, images: torch.Tensor, text_embeddings: torch.Tensor, image_sizes=None):
        """Inference: (B, 3, H, W) in [0, 1] -> (B, K, H/4, W/4) class probabilities."""
        return self.decode_scores(self.encode_image(images, image_sizes), text_embeddings)

    def forward(self, images: torch.Tensor, text_embeddings: torch.Tensor, image_sizes=None) -> dict:
        """Training pass, no rejection: ``logits`` (B, K, H/4, W/4) and ``aux_logits``, the
        three auxiliary heads' logits (B, K, H/32, ..), (.., H/16, ..), (.., H/8, ..)."""
        encoding = self.encode_image(images, image_sizes)
        out = self._decode(encoding, text_embeddings, top_k=0)
        batch, classes = images.shape[0], text_embeddings.shape[0]
        return {
            "logits": out["logits"].unflatten(0, (batch, classes)),
            "aux_logits": [aux.unflatten(0, (batch, classes)) for aux, _, _ in out["aux"]],
        }

    def load_clip_weights(self, clip_model: nn.Module) -> None:
        """Copy an open_clip ``CLIP``'s image tower (with its head) and text tower into
        this model; the architecture must match ``config.clip``."""
        check_activation_matches(self.clip_visual, clip_model.visual)
        visual = build_dense_tower(clip_model.visual, self.config.clip)
        text = TemplateTextEncoder(
            clip_model, self.text.tokenizer, templates=self.text.templates, prompt_length=0
        )
        for target, source in ((self.clip_visual, visual), (self.text, text)):
            result = target.load_state_dict(source.state_dict(), strict=False)
            missing = [k for k in result.missing_keys if not k.startswith("prompt_context")]
            if missing or result.unexpected_keys:
                raise ValueError(
                    f"CLIP weights do not fit the model: missing {missing[:3]}, "
                    f"unexpected {result.unexpected_keys[:3]}"
                )


register_family(
    "sed",
    build=SED,
    config_type=SEDConfig,
    description="ConvNeXt CLIP cost map + gradual-fusion decoder + category early rejection",
)


# -- presets ------------------------------------------------------------------------------------

# The paper's working scale: test images are squashed to 768 x 768 after a 640 short-side
# resize; a 768 short side gives the same scale along the short side while keeping the aspect.
_SED_SHORT_SIDE = 768


def _sed_config(name: str, model_name: str, model_cfg: dict, preprocess: PreprocessConfig,
                templates, section: SEDConfig) -> ModelConfig:
    clip = ClipConfig(
        model_name=model_name,
        model_cfg=model_cfg,
        learned_pos_grid=0,
        learned_pos_blocks=(),
        severance="none",
        severance_blocks=(-1,),
    )
    return ModelConfig(
        family="sed",
        name=name,
        preprocess=preprocess,
        clip=clip,
        text=TextConfig(templates=templates, prompt_length=0),
        family_config=section,
    )


def _sed_preprocess() -> PreprocessConfig:
    # One pass over the whole image (window 0): the reference has no sliding window.
    return PreprocessConfig(
        short_side=_SED_SHORT_SIDE, max_long_side=2560, pad_multiple=32,
        interpolation="bilinear", window=0,
    )


def _open_clip_sed(name: str, open_clip_model: str) -> ModelConfig:
    """The paper's SED on open_clip's ``open_clip_model`` ConvNeXt, 80 ImageNet templates."""
    return _sed_config(
        name, open_clip_model, resolve_open_clip_config(open_clip_model, None),
        _sed_preprocess(), "imagenet80", SEDConfig(),
    )  # fmt: skip


@register_preset
def sed_convnext_b() -> ModelConfig:
    """SED-B: open_clip ``convnext_base_w_320`` (E = 640), the 80 ImageNet templates."""
    return _open_clip_sed("sed-convnext-b", "convnext_base_w_320")


@register_preset
def sed_convnext_l() -> ModelConfig:
    """SED-L: open_clip ``convnext_large_d_320`` (E = 768, MLP head), 80 templates."""
    return _open_clip_sed("sed-convnext-l", "convnext_large_d_320")


# A tiny ConvNeXt CLIP for tests: timm's convnext_atto trunk through open_clip, the tiny
# text tower of the other families.
TINY_CONVNEXT_CLIP_CFG: dict = {
    "embed_dim": 32,
    "vision_cfg": {
        "timm_model_name": "convnext_atto",
        "timm_model_pretrained": False,
        "timm_pool": "",
        "timm_proj": "linear",
        "image_size": 64,
    },
    "text_cfg": copy.deepcopy(TINY_CLIP_CFG["text_cfg"]),
}
_TINY_TEMPLATES = ["a photo of a {}.", "a drawing of a {}.", "a {} in a scene."]


@register_preset
def sed_tiny() -> ModelConfig:
    """A toy-sized SED for tests (random weights, 64 px, 3 templates)."""
    preprocess = PreprocessConfig(
        short_side=64, max_long_side=256, pad_multiple=32, interpolation="bilinear", window=0
    )
    section = SEDConfig(
        hidden_dim=32,
        decoder_dims=(32, 16, 16),
        guidance_dims=(8, 8, 4),
        num_heads=4,
        convnext_kernel=3,
        cost_kernel=3,
        class_chunk=16,
    )
    return _sed_config(
        "sed-tiny", "sed-tiny", copy.deepcopy(TINY_CONVNEXT_CLIP_CFG), preprocess,
        list(_TINY_TEMPLATES), section,
    )
