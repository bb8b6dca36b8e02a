"""GKC (Global Knowledge Calibration, ICCV 2023): a Mask2Former classifying its queries
against frozen CLIP text embeddings, with NO CLIP image pass at inference.

Data flow, for images (B, 3, H, W) in [0, 1], H and W multiples of 32:

1. backbone: the CLIP ResNet image trunk (stem + res2..res5, open_clip's ``ModifiedResNet``
   without its attention pool; the attention pool is never built) or a timm backbone ->
   features at strides 4/8/16/32;
2. :class:`~onepass_ovs.models.mask2former.DeformablePixelDecoder` -> stride-4 mask
   features + three encoded levels;
3. :class:`~onepass_ovs.models.mask2former.MaskedAttentionDecoder` -> per output (the
   learnable queries, then after each layer) queries (B, N, d) and mask logits (B, N, H/4,
   W/4);
4. class embedding per output: LayerNorm -> Linear d->d (shared) -> ReLU -> Linear d->E
   (one per output) -> L2 norm;
5. logits = exp(s) * cos(embedding, [names; no-object]) with s learnable (init
   ln(1/0.07), unclamped); a class with several names takes the max over its names'
   logits; the no-object embedding is learned;
6. semantic scores: DeOP's assembly sum_n softmax(logits_n)[c] * sigmoid(up(M_n)) of the
   last output (:class:`~onepass_ovs.models.assembly.AssembledScores`).

Text side: ``model.text(vocabulary)`` returns (K, S, E): S = the most names any class
has; each class's rows are its names' normalised embeddings, padded by repeating its first
name (a max over rows is then the max over its names). ``decode_scores`` also accepts a
(K, E) tensor (one name per class). The text tower is frozen (``requires_grad`` off).

A saved ``gkc`` model is the segmenter (trunk, decoders, heads) and the text tower: no CLIP
image-tower head or pooling weights, and nothing here builds one.
"""

from __future__ import annotations

import copy
import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ClipConfig,
    ModelConfig,
    PreprocessConfig,
    TextConfig,
)
from ..text import parse_vocabulary
from .assembly import AssembledScores
from .mask2former import DeformablePixelDecoder, MaskedAttentionDecoder
from .preprocessing import normalise, valid_region
from .registry import register_family, register_preset
from .towers import (
    TINY_CLIP_CFG,
    build_text_tower,
    check_activation_matches,
    create_timm_image_tower,
    resolve_open_clip_config,
)

CLIP_RESNET = "clip-resnet"
CLIP_CONVNEXT = "clip-convnext"


@dataclass
class GKCConfig:
    """GKC's own section of the model config.

    ``backbone``: ``"clip-resnet"`` (the CLIP ResNet trunk described by
    ``clip.model_cfg['vision_cfg']``), ``"clip-convnext"`` (the timm ConvNeXt trunk of a
    ConvNeXt CLIP described there) or a timm model name giving strides 4/8/16/32
    (``backbone_kwargs`` passed to ``timm.create_model``).
    """

    backbone: str = CLIP_RESNET
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)
    hidden_dim: int = 256
    mask_dim: int = 256
    norm_groups: int = 32
    # pixel decoder (deformable encoder over strides 8/16/32)
    encoder_layers: int = 6
    encoder_heads: int = 8
    encoder_points: int = 4
    encoder_ffn_dim: int = 1024
    # masked-attention decoder
    num_queries: int = 100
    num_heads: int = 8
    dim_feedforward: int = 2048
    dec_layers: int = 9
    dropout: float = 0.0
    # class head: LayerNorm -> Linear hidden->class_hidden (shared) -> ReLU -> Linear to the
    # text width (one per output)
    class_hidden: int = 256
    logit_scale_init: float = math.log(1 / 0.07)


# -- backbones ----------------------------------------------------------------------------------


class CLIPResNetTrunk(nn.Module):
    """open_clip's ``ModifiedResNet`` without its attention pool: 3-conv stem, avg pool,
    four Bottleneck stages. Parameter names match open_clip's, so a CLIP RN's ``visual``
    state dict minus ``attnpool.*`` loads into it.

    ``forward(images (B, 3, H, W))`` -> [res2, res3, res4, res5], strides 4/8/16/32,
    channels ``width * 4 * 2**i``.
    """

    def __init__(self, layers: Sequence[int], width: int = 64):
        super().__init__()
        from open_clip.modified_resnet import Bottleneck

        layers = [int(n) for n in layers]
        if len(layers) != 4:
            raise ValueError(f"a CLIP ResNet trunk has 4 stages, got layers={layers}")
        self.conv1 = nn.Conv2d(3, width // 2, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width // 2)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(width // 2, width // 2, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width // 2)
        self.act2 = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv2d(width // 2, width, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.act3 = nn.ReLU(inplace=True)
        self.avgpool = nn.AvgPool2d(2)
        inplanes = width
        stages = []
        for index, blocks in enumerate(layers):
            planes = width * 2**index
            stride = 1 if index == 0 else 2
            stage = [Bottleneck(inplanes, planes, stride)]
            inplanes = planes * Bottleneck.expansion
            stage += [Bottleneck(inplanes, planes) for _ in range(1, blocks)]
            stages.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.channels = [width * 4 * 2**i for i in range(4)]
        # open_clip's init: the last BN of each residual branch starts at zero
        for stage in stages:
            for name, param in stage.named_parameters():
                if name.endswith("bn3.weight"):
                    nn.init.zeros_(param)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        x = self.act1(self.bn1(self.conv1(images.to(self.conv1.weight.dtype))))
        x = self.act2(self.bn2(self.conv2(x)))
        x = self.avgpool(self.act3(self.bn3(self.conv3(x))))
        out = []
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = stage(x)
            out.append(x)
        return out


class CLIPConvNeXtTrunk(nn.Module):
    """The timm ConvNeXt trunk of an open_clip ConvNeXt CLIP (``vision_cfg`` with a
    ``timm_model_name``), without its pooling and heads: stem and four stages. Parameter
    names match the CLIP's ``visual.trunk``, so its state dict minus ``head.*`` loads.

    ``forward(images (B, 3, H, W))`` -> the four stage outputs, strides 4/8/16/32 for
    timm's default stem (2/4/8/16 for the shapes world's patch-2 stem without the first
    downsample; the decoders take the stages in order, whatever their strides).
    """

    def __init__(self, clip: ClipConfig):
        super().__init__()
        cfg = resolve_open_clip_config(clip.model_name, clip.model_cfg)
        vision = cfg.get("vision_cfg", {})
        if "timm_model_name" not in vision:
            raise ValueError(
                f"gkc backbone 'clip-convnext' needs a timm ConvNeXt CLIP config (vision_cfg."
                f"timm_model_name); clip {clip.model_name!r} has none"
            )
        trunk = create_timm_image_tower(cfg).trunk
        if not hasattr(trunk, "stages") or not hasattr(trunk, "stem"):
            raise ValueError(f"{vision['timm_model_name']!r} is not a timm ConvNeXt")
        self.stem = trunk.stem
        self.stages = trunk.stages
        self.channels = [
            getattr(fc2, "out_features", None) or fc2.out_channels
            for fc2 in (stage.blocks[-1].mlp.fc2 for stage in trunk.stages)
        ]

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(images.to(next(self.stem.parameters()).dtype))
        out = []
        for stage in self.stages:
            x = stage(x)
            out.append(x)
        return out


class TimmBackbone(nn.Module):
    """A timm ``features_only`` backbone giving strides 4/8/16/32."""

    def __init__(self, name: str, kwargs: dict):
        super().__init__()
        import timm

        kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
        self.body = timm.create_model(name, pretrained=False, features_only=True, out_indices=(1, 2, 3, 4), **kwargs)
        if list(self.body.feature_info.reduction()) != [4, 8, 16, 32]:
            raise ValueError(
                f"backbone {name!r} must give strides 4/8/16/32, got {self.body.feature_info.reduction()}"
            )
        self.channels = list(self.body.feature_info.channels())

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        return list(self.body(images))


def build_backbone(section: GKCConfig, clip: ClipConfig) -> nn.Module:
    if section.backbone == CLIP_RESNET:
        vision = clip.model_cfg.get("vision_cfg", {})
        layers = vision.get("layers")
        if not isinstance(layers, (list, tuple)):
            raise ValueError(
                f"gkc backbone 'clip-resnet' needs a CLIP ResNet config (vision_cfg.layers a list "
                f"of 4 stage depths); clip {clip.model_name!r} has layers={layers!r}"
            )
        return CLIPResNetTrunk(layers, int(vision.get("width", 64)))
    if section.backbone == CLIP_CONVNEXT:
        return CLIPConvNeXtTrunk(clip)
    return TimmBackbone(section.backbone, section.backbone_kwargs)


def build_text_only_clip(clip: ClipConfig) -> SimpleNamespace:
    """The parts of an open_clip ``CLIP`` the text encoder reads, built from the text config
    alone (open_clip's own text-tower builder): no image tower is instantiated."""
    from open_clip.model import _build_text_tower

    clip.model_cfg = resolve_open_clip_config(clip.model_name, clip.model_cfg)
    cfg = clip.model_cfg
    text_cfg = cfg.get("text_cfg", {})
    if cfg.get("custom_text", False) or "hf_model_name" in text_cfg:
        raise ValueError("CLIP models with a Hugging Face text tower are not supported yet")
    tower = _build_text_tower(cfg["embed_dim"], text_cfg, quick_gelu=bool(cfg.get("quick_gelu", False)))
    if getattr(tower, "cls_emb", None) is not None:
        raise ValueError("text towers with an appended CLS embedding (CoCa) are not supported")
    return SimpleNamespace(
        token_embedding=tower.token_embedding,
        positional_embedding=tower.positional_embedding,
        transformer=tower.transformer,
        ln_final=tower.ln_final,
        text_projection=tower.text_projection,
        attn_mask=tower.attn_mask,
        text_pool_type=tower.pool_type,
        text_eos_id=tower.eos_id,
    )


# -- the model -----------------------------------------------------------------------------------


class GKC(nn.Module):
    """The GKC model. Build with ``GKC(config)`` (random init) and load weights into it."""

    family = "gkc"

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        section: GKCConfig = config.family_config
        self.backbone = build_backbone(section, config.clip)
        self.text_encoder = build_text_tower(build_text_only_clip(config.clip), config.clip, config.text)
        self.text_encoder.requires_grad_(False)  # frozen CLIP text embeddings
        text_dim = self.text_encoder.embed_dim
        self.pixel_decoder = DeformablePixelDecoder(
            self.backbone.channels,
            dim=section.hidden_dim,
            mask_dim=section.mask_dim,
            encoder_levels=3,
            encoder_layers=section.encoder_layers,
            heads=section.encoder_heads,
            points=section.encoder_points,
            ffn_dim=section.encoder_ffn_dim,
            dropout=section.dropout,
            norm_groups=section.norm_groups,
        )
        self.decoder = MaskedAttentionDecoder(
            dim=section.hidden_dim,
            num_queries=section.num_queries,
            heads=section.num_heads,
            ffn_dim=section.dim_feedforward,
            layers=section.dec_layers,
            dropout=section.dropout,
            mask_dim=section.mask_dim,
            levels=3,
        )
        outputs = self.decoder.num_outputs
        self.class_norm = nn.LayerNorm(section.hidden_dim)
        self.class_hidden = nn.Linear(section.hidden_dim, section.class_hidden)
        self.class_proj = nn.ModuleList(nn.Linear(section.class_hidden, text_dim) for _ in range(outputs))
        # the student head of text-guided distillation (training only): its own linear map
        # of the shared class-Linear output, per output
        self.distill_proj = nn.ModuleList(nn.Linear(section.class_hidden, text_dim) for _ in range(outputs))
        self.void_embedding = nn.Parameter(torch.randn(1, text_dim) * text_dim**-0.5)
        self.logit_scale = nn.Parameter(torch.tensor(float(section.logit_scale_init)))

    @property
    def embed_dim(self) -> int:
        return self.text_encoder.embed_dim

    # -- text -------------------------------------------------------------------------------
    def text(self, vocabulary: Sequence[str]) -> torch.Tensor:
        """(K, S, E) normalised per-name embeddings; class k's rows are its names, padded to
        S (the most names of any class) by repeating its first name. Cached per name."""
        classes = parse_vocabulary(vocabulary)
        names = [n for synonyms in classes for n in synonyms]
        flat = self.text_encoder(names)  # (total names, E), one entry per name
        index = {n: i for i, n in enumerate(names)}
        width = max(len(synonyms) for synonyms in classes)
        rows = [
            [index[synonyms[j]] if j < len(synonyms) else index[synonyms[0]] for j in range(width)]
            for synonyms in classes
        ]
        return flat[torch.tensor(rows, device=flat.device)]

    # -- image ------------------------------------------------------------------------------
    def run_decoders(self, images: torch.Tensor, image_sizes=None) -> list[dict]:
        """images (B, 3, H, W) in [0, 1], zero-padded -> one dict per decoder output with
        ``queries`` (B, N, d), ``mask_logits`` (B, N, H/4, W/4) and ``class_hidden``
        (B, N, class_hidden), the shared class-Linear output after its ReLU."""
        pre = self.config.preprocess
        valid = valid_region(image_sizes, images.shape, images.device, images.dtype)
        features = self.backbone(normalise(images, pre.mean, pre.std, valid))
        mask_features, multi_scale = self.pixel_decoder(features)
        outputs = self.decoder(multi_scale, mask_features)
        for out in outputs:
            out["class_hidden"] = F.relu(self.class_hidden(self.class_norm(out["queries"])))
        return outputs

    def class_embeddings(self, class_hidden: torch.Tensor, output: int = -1) -> torch.Tensor:
        """(B, N, class_hidden) -> (B, N, E) normalised class embeddings of one output."""
        return F.normalize(self.class_proj[output](class_hidden).float(), dim=-1)

    def distill_embeddings(self, class_hidden: torch.Tensor, output: int = -1) -> torch.Tensor:
        """(B, N, class_hidden) -> (B, N, E) normalised student embeddings for distillation."""
        return F.normalize(self.distill_proj[output](class_hidden).float(), dim=-1)

    def encode_image(self, images: torch.Tensor, image_sizes=None) -> dict:
        """Steps 1-4 (vocabulary-independent): ``mask_logits`` (B, N, H/4, W/4) and
        ``embeddings`` (B, N, E) of the last output, ``canvas`` (H, W)."""
        last = self.run_decoders(images, image_sizes)[-1]
        return {
            "mask_logits": last["mask_logits"],
            "embeddings": self.class_embeddings(last["class_hidden"]),
            "canvas": tuple(images.shape[-2:]),
        }

    def classify(self, embeddings: torch.Tensor, text_embeddings: torch.Tensor) -> torch.Tensor:
        """embeddings (B, N, E) normalised; text (K, S, E) or (K, E) normalised ->
        logits (B, N, K+1), no-object last; each class's logit is the max over its names."""
        if text_embeddings.dim() == 2:
            text_embeddings = text_embeddings[:, None]
        if text_embeddings.dim() != 3 or text_embeddings.shape[-1] != embeddings.shape[-1]:
            raise ValueError(
                f"text embeddings must be (K, S, {embeddings.shape[-1]}) or (K, {embeddings.shape[-1]}), "
                f"got {tuple(text_embeddings.shape)}"
            )
        scale = self.logit_scale.float().exp()
        e = embeddings.float()
        names = torch.einsum("bne,kse->bnks", e, text_embeddings.float()).amax(-1)
        void = e @ F.normalize(self.void_embedding.float(), dim=-1).t()
        return scale * torch.cat([names, void], -1)

    def forward(self, images: torch.Tensor, text_embeddings: torch.Tensor, image_sizes=None) -> dict:
        """Training pass: the last output's ``mask_logits``, ``class_logits`` (B, N, K+1) and
        ``distill_embeddings`` (B, N, E), with ``aux``: the same for every earlier output
        (the learnable queries' prediction first)."""
        outputs = self.run_decoders(images, image_sizes)
        results = []
        for index, out in enumerate(outputs):
            hidden = out["class_hidden"]
            results.append({
                "mask_logits": out["mask_logits"],
                "class_logits": self.classify(self.class_embeddings(hidden, index), text_embeddings),
                "distill_embeddings": self.distill_embeddings(hidden, index),
            })
        final = results[-1]
        final["aux"] = results[:-1]
        return final

    def decode_scores(self, encoding: dict, text_embeddings: torch.Tensor) -> AssembledScores:
        """Steps 5-6: assembled class scores (B, K, H, W) on the padded canvas (lazy)."""
        logits = self.classify(encoding["embeddings"], text_embeddings)
        return AssembledScores(encoding["mask_logits"], logits, encoding["canvas"])

    def predict_scores(self, images: torch.Tensor, text_embeddings: torch.Tensor, image_sizes=None):
        """Inference: (B, 3, H, W) in [0, 1] -> (B, K, H, W) assembled class scores."""
        return self.decode_scores(self.encode_image(images, image_sizes), text_embeddings)

    def load_clip_weights(self, clip_model: nn.Module) -> None:
        """Copy an open_clip CLIP's image trunk (:meth:`load_trunk_weights`) and its text
        tower (:meth:`load_text_weights`) into this model."""
        self.load_trunk_weights(clip_model)
        self.load_text_weights(clip_model)

    def load_trunk_weights(self, clip_model: nn.Module) -> None:
        """Copy an open_clip CLIP's image trunk into the backbone: a ResNet CLIP's
        ``visual`` without its attention pool ('clip-resnet'), or a timm ConvNeXt CLIP's
        ``visual.trunk`` without its head ('clip-convnext')."""
        if isinstance(self.backbone, CLIPResNetTrunk):
            skip, source = "attnpool.", clip_model.visual
        elif isinstance(self.backbone, CLIPConvNeXtTrunk):
            skip, source = "head.", getattr(clip_model.visual, "trunk", None)
            if source is None:
                raise ValueError("the 'clip-convnext' backbone loads a timm ConvNeXt CLIP's trunk")
        else:
            raise ValueError("load_clip_weights needs the 'clip-resnet' or 'clip-convnext' backbone")
        visual = OrderedDict((k, v) for k, v in source.state_dict().items() if not k.startswith(skip))
        self.backbone.load_state_dict(visual, strict=True)

    def load_text_weights(self, clip_model: nn.Module) -> None:
        """Copy an open_clip ``CLIP``'s text tower (any image tower) into this model: a
        segmenter whose trunk is trained from scratch still names classes with that
        CLIP's text embeddings."""
        check_activation_matches(self.text_encoder, clip_model)
        text_state = {
            k: v for k, v in clip_model.state_dict().items()
            if k.split(".")[0] in ("token_embedding", "positional_embedding", "transformer",
                                   "ln_final", "text_projection")
        }
        result = self.text_encoder.load_state_dict(text_state, strict=False)
        if [k for k in result.missing_keys if not k.startswith("prompt_context")] or result.unexpected_keys:
            raise ValueError(
                f"CLIP text weights do not fit the model: missing {result.missing_keys[:3]}, "
                f"unexpected {result.unexpected_keys[:3]}"
            )


register_family(
    "gkc",
    build=GKC,
    config_type=GKCConfig,
    description="Mask2Former on a CLIP ResNet trunk classifying queries against CLIP text; no CLIP image pass",
)


# -- presets ------------------------------------------------------------------------------------


@register_preset
def gkc_clip_rn50() -> ModelConfig:
    """The paper's geometry: CLIP RN50 trunk (OpenAI's, so QuickGELU in the text tower),
    ImageNet normalisation, 6-layer deformable pixel decoder, 9-layer masked-attention
    decoder with 100 queries, bare class names as text."""
    model_cfg = {**resolve_open_clip_config("RN50", None), "quick_gelu": True}
    return ModelConfig(
        family="gkc",
        name="gkc-clip-rn50",
        # the trunk is fine-tuned on ImageNet-normalised images, as the paper; clip_mean/std
        # stay CLIP's (a distillation teacher's input)
        preprocess=PreprocessConfig(short_side=512, mean=IMAGENET_MEAN, std=IMAGENET_STD),
        clip=ClipConfig(model_name="RN50", model_cfg=model_cfg),
        text=TextConfig(templates=["{}"], prompt_length=0),
        family_config=GKCConfig(),
    )


@register_preset
def gkc_tiny() -> ModelConfig:
    """A toy-sized GKC for tests (random weights, 64 px): a one-block-per-stage CLIP ResNet
    trunk of width 8 and the tiny CLIP's text tower."""
    model_cfg = copy.deepcopy(TINY_CLIP_CFG)
    model_cfg["vision_cfg"] = {"image_size": 64, "layers": [1, 1, 1, 1], "width": 8, "patch_size": None}
    return ModelConfig(
        family="gkc",
        name="gkc-tiny",
        preprocess=PreprocessConfig(
            short_side=64, max_long_side=256, pad_multiple=32, mean=IMAGENET_MEAN, std=IMAGENET_STD
        ),
        clip=ClipConfig(model_name="tiny-rn", model_cfg=model_cfg),
        text=TextConfig(templates=["{}"], prompt_length=0),
        family_config=GKCConfig(
            hidden_dim=16,
            mask_dim=16,
            norm_groups=4,
            encoder_layers=1,
            encoder_heads=2,
            encoder_points=2,
            encoder_ffn_dim=32,
            num_queries=6,
            num_heads=2,
            dim_feedforward=32,
            dec_layers=2,
            class_hidden=16,
        ),
    )
