"""Training-free segmentation with any open_clip ViT: ONE CLIP pass, dense classification.

Data flow (docs/methods.md section 2), images (B, 3, H, W) in [0, 1],
H and W multiples of the patch size p:

1. the CLIP ViT at native resolution (positions interpolated to the grid h = H/p, w = W/p)
   with its last block severed (``config.clip.severance``):
   ``clearclip`` (default: query-query attention, the block's residual and FFN removed),
   ``identity`` (DeOP's GPS: each token keeps its own value), ``mask-guided`` (DeOP's MPS,
   needs masks) or ``none`` (plain CLIP);
2. dense patch embeddings F (B, E, h, w), L2-normalised;
3. class probabilities softmax_k(s * cos(F, t_k)) -> (B, K, h, w), where t_k is the class
   embedding from the 80-template ImageNet ensemble (synonyms averaged) and s is CLIP's
   logit scale (``config.clip.logit_scale``; the temperature is 1/s).

With external masks (DeOP's training-free demo) each mask's average of F is classified the
same way and painted over its pixels (:meth:`TrainingFreeCLIP.mask_scores`).
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import CLIP_MEAN, CLIP_STD, ClipConfig, ModelConfig, PreprocessConfig, TextConfig
from .anchors import mask_average_pool
from .preprocessing import normalise, valid_region
from .registry import load_config, register_family, register_preset
from .towers import (
    TINY_CLIP_CFG,
    build_dense_tower,
    build_text_tower,
    create_clip,
    load_open_clip_weights,
    resolve_open_clip_config,
    tower_kind,
)

# Severance variants that read the masks: they cannot run on an image alone.
_NEEDS_MASKS = ("weighted", "mask-guided")
# Mask coverage is turned into logits for the severance; clamping keeps them finite.
_COVERAGE_EPS = 1e-4

# Working resolution of the family (see docs/training_free.md): short side 448 and windows
# of 448 keep the patch grid (28 x 28 for p = 16) near what CLIP ViTs were trained at.
DEFAULT_SHORT_SIDE = 448
DEFAULT_WINDOW = 448


def check_supported(model_cfg: dict, severance: str = "none") -> None:
    """Raise ``ValueError`` unless a dense adapter runs this CLIP's image tower with the
    given severance (severance needs a ViT)."""
    kind = tower_kind(ClipConfig(model_name="custom", model_cfg=model_cfg))
    if severance != "none" and not kind.startswith("vit"):
        raise ValueError(
            f"severance {severance!r} needs a ViT image tower; this CLIP's is {kind!r} "
            "(use severance='none')"
        )


def clip_model_config(
    model: str | dict,
    *,
    name: str = "",
    severance: str = "clearclip",
    templates: str | list[str] = "imagenet80",
    logit_scale: float = 100.0,
    mean=CLIP_MEAN,
    std=CLIP_STD,
    interpolation: str = "bicubic",
) -> ModelConfig:
    """A ``clip``-family ModelConfig for an open_clip model name or full model config dict.

    ``Segmenter.from_config(clip_model_config("ViT-B-16"))`` gives a randomly initialised
    model (benchmarks, tests); :func:`load_training_free` fills in pretrained weights.
    """
    model_name = model if isinstance(model, str) else "custom"
    model_cfg = resolve_open_clip_config(model_name, None if isinstance(model, str) else model)
    check_supported(model_cfg, severance)
    patch = model_cfg.get("vision_cfg", {}).get("patch_size", 16)
    patch_h, patch_w = (patch, patch) if isinstance(patch, int) else patch
    if interpolation not in ("bilinear", "bicubic", "nearest"):
        interpolation = "bicubic"
    preprocess = PreprocessConfig(
        short_side=DEFAULT_SHORT_SIDE,
        # padding to the patch (not 32) wastes the least compute; windows stay aligned
        pad_multiple=math.lcm(patch_h, patch_w),
        mean=tuple(mean),
        std=tuple(std),
        clip_mean=tuple(mean),
        clip_std=tuple(std),
        interpolation=interpolation,
        window=DEFAULT_WINDOW,
    )
    clip = ClipConfig(
        model_name=model_name,
        model_cfg=model_cfg,
        learned_pos_grid=0,
        learned_pos_blocks=(),
        severance=severance,
        severance_blocks=(-1,),
        logit_scale=float(logit_scale),
    )
    text = TextConfig(templates=copy.deepcopy(templates), prompt_length=0)
    return ModelConfig(family="clip", name=name, preprocess=preprocess, clip=clip, text=text)


class TrainingFreeCLIP(nn.Module):
    """Dense CLIP classifier. Build with ``TrainingFreeCLIP(config)`` (random weights) or
    :func:`load_training_free`; ``clip_model`` wraps an already loaded open_clip ``CLIP``.

    Its state dict holds ``clip_visual.*`` and ``text.*`` only (the names DeOP uses for the
    same parts), so the CLIP inside a saved DeOP model loads directly.
    """

    family = "clip"

    def __init__(self, config: ModelConfig, clip_model: nn.Module | None = None):
        super().__init__()
        self.config = config
        if clip_model is None:
            clip_model = create_clip(config.clip)  # resolves config.clip.model_cfg
        check_supported(config.clip.model_cfg, config.clip.severance)
        self.clip_visual = build_dense_tower(clip_model.visual, config.clip)
        self.text = build_text_tower(clip_model, config.clip, config.text)

    @property
    def embed_dim(self) -> int:
        return self.clip_visual.output_dim

    @property
    def needs_masks(self) -> bool:
        """True when the severance variant reads masks (``mask-guided``, ``weighted``)."""
        return getattr(self.clip_visual, "severance", "none") in _NEEDS_MASKS

    def encode_image(self, images: torch.Tensor, image_sizes=None) -> dict:
        """The vocabulary-independent pass: ``{"dense": (B, E, h, w)}`` normalised features."""
        return {"dense": self.dense_features(images, image_sizes)}

    def decode_scores(self, encoding: dict, text_embeddings: torch.Tensor) -> torch.Tensor:
        """Class probabilities (B, K, h, w) of the dense features."""
        return self.classify(encoding["dense"], text_embeddings)

    def dense_features(
        self, images: torch.Tensor, image_sizes=None, masks: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Dense normalised CLIP features (B, E, h, w).

        images: (B, 3, H, W) in [0, 1], zero-padded; image_sizes: the valid (h, w) of each.
        masks: (B, M, H', W') in [0, 1] on the same canvas at any resolution that the patch
        grid divides; only the mask-reading severance variants use them.
        """
        pre = self.config.preprocess
        valid = valid_region(image_sizes, images.shape, images.device, images.dtype)
        x = normalise(images, pre.clip_mean, pre.clip_std, valid)
        mask_logits = None
        if self.needs_masks:
            if masks is None or masks.shape[1] == 0:
                raise ValueError(
                    f"severance {self.clip_visual.severance!r} needs masks: "
                    "segment(..., masks=...) with at least one mask per image"
                )
            grid = self.clip_visual.grid_size(x.shape[-2], x.shape[-1])
            # area coverage per patch, not a point sample: thin masks still count
            coverage = F.adaptive_avg_pool2d(masks.float(), grid)
            mask_logits = torch.logit(coverage.clamp(_COVERAGE_EPS, 1 - _COVERAGE_EPS))
        dense, grid = self.clip_visual(x, mask_logits)
        return dense.transpose(1, 2).unflatten(-1, grid)

    def classify(self, dense: torch.Tensor, text_embeddings: torch.Tensor) -> torch.Tensor:
        """dense (B, E, h, w), text (K, E), both normalised -> probabilities (B, K, h, w)."""
        logits = torch.einsum("behw,ke->bkhw", dense.float(), text_embeddings.float())
        return (self.config.clip.logit_scale * logits).softmax(1)

    def predict_scores(self, images: torch.Tensor, text_embeddings: torch.Tensor, image_sizes=None):
        """Inference: (B, 3, H, W) in [0, 1] -> (B, K, H/p, W/p) class probabilities."""
        return self.decode_scores(self.encode_image(images, image_sizes), text_embeddings)

    def mask_scores(
        self, dense: torch.Tensor, masks: torch.Tensor, text_embeddings: torch.Tensor
    ) -> torch.Tensor:
        """Classify each mask by its average feature and paint the masks -> (K, h', w').

        dense: (E, h, w) features of one image; masks: (M, h', w') in [0, 1] on the same
        canvas (h' a multiple of h); text: (K, E).

        A pixel's scores are sum_m mask_m * p_m (p_m the mask's class probabilities), so
        overlapping masks average their class distributions (weighted by mask value), plus
        (1 - coverage) * the dense per-patch probabilities where masks cover less than the
        whole pixel: uncovered pixels are classified densely, as without masks.
        """
        _, h, w = dense.shape
        masks = masks.float()
        coverage = F.adaptive_avg_pool2d(masks[None], (h, w))[0].flatten(1)  # (M, h*w)
        pooled = mask_average_pool(dense.flatten(1).t()[None].float(), coverage[None])[0]
        scale = self.config.clip.logit_scale
        mask_probs = (scale * pooled @ text_embeddings.float().t()).softmax(-1)  # (M, K)
        painted = torch.einsum("mk,mhw->khw", mask_probs, masks)
        uncovered = (1 - masks.sum(0)).clamp_min(0)
        dense_probs = self.classify(dense[None], text_embeddings)
        dense_probs = F.interpolate(
            dense_probs, size=masks.shape[-2:], mode="bilinear", align_corners=False
        )[0]
        return painted + uncovered * dense_probs


# -- loading ---------------------------------------------------------------------------------


def load_training_free(
    source,
    *,
    severance: str = "clearclip",
    templates: str | list[str] = "imagenet80",
    logit_scale: float | None = None,
) -> TrainingFreeCLIP:
    """A :class:`TrainingFreeCLIP` with the weights of a :class:`~onepass_ovs.hub.ClipSource`.

    ``logit_scale`` None takes the checkpoint's own (CLIP's learned scale; for a saved DeOP
    model, the scale its classifier used).
    """
    if source.folder is not None:
        return _from_onepass_folder(source, severance, templates, logit_scale)
    check_supported(source.model_cfg, severance)
    clip = create_clip(ClipConfig(model_name=source.name, model_cfg=source.model_cfg))
    load_open_clip_weights(clip, source.weights)
    if logit_scale is None:
        logit_scale = float(clip.logit_scale.detach().exp().reshape(-1)[0])
    pre = source.preprocess
    config = clip_model_config(
        source.model_cfg,
        name=source.name,
        severance=severance,
        templates=templates,
        logit_scale=logit_scale,
        mean=pre.get("mean", CLIP_MEAN),
        std=pre.get("std", CLIP_STD),
        interpolation=pre.get("interpolation", "bicubic"),
    )
    config.clip.model_name = source.name
    return TrainingFreeCLIP(config, clip).eval()


def _from_onepass_folder(source, severance, templates, logit_scale) -> TrainingFreeCLIP:
    """The CLIP parts (``clip_visual.*`` minus learned positions, ``text.*`` minus learned
    prompt context) of a saved onepass model, wrapped as a training-free model."""
    from safetensors import safe_open

    from ..hub import CONFIG_NAME, WEIGHTS_NAME

    saved = load_config(source.folder / CONFIG_NAME)
    model_cfg = resolve_open_clip_config(saved.clip.model_name, saved.clip.model_cfg)
    if logit_scale is None:
        # the scale the saved model classified with (DeOP's classifier keeps its own)
        anchors = getattr(saved.family_config, "anchors", None)
        logit_scale = anchors.logit_scale if anchors is not None else saved.clip.logit_scale
    config = clip_model_config(
        model_cfg,
        name=source.name,
        severance=severance,
        templates=templates,
        logit_scale=logit_scale,
        mean=saved.preprocess.clip_mean,
        std=saved.preprocess.clip_std,
        interpolation=saved.preprocess.interpolation,
    )
    config.clip.model_name = source.name
    config.clip.conv_stem = saved.clip.conv_stem
    # the CLIP was trained (and its positions tuned) at the saved model's working size
    for field in ("short_side", "max_long_side", "window"):
        setattr(config.preprocess, field, getattr(saved.preprocess, field))
    model = TrainingFreeCLIP(config)
    expected = model.state_dict()
    path = source.folder / WEIGHTS_NAME
    with safe_open(str(path), framework="pt") as weights:
        available = set(weights.keys())
        missing = sorted(set(expected) - available)
        if missing:
            raise ValueError(
                f"{path} lacks the CLIP weights of a training-free model: {len(missing)} missing "
                f"(e.g. {missing[:3]})"
            )
        state = {}
        for key, ref in expected.items():
            tensor = weights.get_tensor(key)
            if tensor.shape != ref.shape:
                raise ValueError(
                    f"{path}: {key} has shape {tuple(tensor.shape)}, expected {tuple(ref.shape)}"
                )
            state[key] = tensor.to(ref.dtype)
    model.load_state_dict(state, strict=True)
    return model.eval()


def _upgrade_v1(data: dict) -> dict:
    """Format 1 stored DeOP's proposal and CAL sections in every config; unused here."""
    data.pop("proposals", None)
    data.pop("anchors", None)
    return data


register_family(
    "clip",
    build=TrainingFreeCLIP,
    upgrade=_upgrade_v1,
    description="training-free: one CLIP pass with last-block severance, dense classification",
)


@register_preset
def clip_vit_b16() -> ModelConfig:
    """ViT-B/16 with OpenAI's architecture (QuickGELU), random weights: for benchmarks and
    tests; pretrained weights come through ``Segmenter.from_clip`` / ``clip:`` names."""
    model_cfg = {**resolve_open_clip_config("ViT-B-16", None), "quick_gelu": True}
    return clip_model_config(model_cfg, name="clip-vit-b16")


@register_preset
def clip_tiny() -> ModelConfig:
    """A toy-sized training-free model for tests (random weights)."""
    return clip_model_config(copy.deepcopy(TINY_CLIP_CFG), name="clip-tiny", templates="single")
