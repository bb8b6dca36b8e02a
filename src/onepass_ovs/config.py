"""Model configurations: plain dataclasses that round-trip through ``config.json``.

A saved model is ``config.json`` + ``model.safetensors``; the config holds everything
needed to rebuild the architecture *and* to preprocess images the way the weights
expect (mean/std, resize policy), so transforms are derived from it, never hand-coded
at call sites.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

SEVERANCE_VARIANTS = ("weighted", "identity", "mask-guided", "clearclip", "none")
FAMILIES = ("deop", "clip")


@dataclass
class PreprocessConfig:
    """How an image becomes a model input.

    The image is resized so its short side is ``short_side`` (the long side capped at
    ``max_long_side``), normalised, then zero-padded (in normalised space) to a multiple
    of ``pad_multiple``. The proposal stream and the CLIP stream may use different
    normalisations (DeOP's reference feeds both the ImageNet-normalised tensor).

    Images whose padded working size exceeds ``window`` on either side are segmented in
    overlapping ``window`` x ``window`` tiles ``window_stride`` apart (0: 3/4 of the window),
    their class scores blended (``window_blend``: "linear" ramps across overlaps, "mean"
    averages); ``window = 0`` always runs one pass. Both are rounded down to multiples of
    ``pad_multiple``.
    """

    short_side: int = 512
    max_long_side: int = 2560
    pad_multiple: int = 32
    mean: tuple[float, ...] = CLIP_MEAN
    std: tuple[float, ...] = CLIP_STD
    clip_mean: tuple[float, ...] = CLIP_MEAN
    clip_std: tuple[float, ...] = CLIP_STD
    interpolation: str = "bilinear"
    window: int = 1024
    window_stride: int = 0
    window_blend: str = "linear"


@dataclass
class ClipConfig:
    """The CLIP ViT (open_clip) and DeOP's modifications of its image tower.

    ``model_cfg`` is open_clip's model config dict (``embed_dim``, ``vision_cfg``,
    ``text_cfg``, ...): stored in full so custom architectures travel with the weights.
    ``model_name`` names an open_clip config used when ``model_cfg`` is empty.
    """

    model_name: str = "ViT-B-16"
    model_cfg: dict[str, Any] = field(default_factory=dict)
    # Learned extra positional tables (DeOP): a (1 + g*g, width) table added at the
    # input and one per listed block, bicubically interpolated to the feature grid.
    # learned_pos_grid = 0 turns them off.
    learned_pos_grid: int = 24
    learned_pos_blocks: tuple[int, ...] = (1, 2, 3, 4, 5)
    severance: str = "weighted"
    severance_blocks: tuple[int, ...] = (11,)
    # CLIP's logit scale (1 / temperature) for the training-free family's dense classifier;
    # loading a checkpoint stores its own learned value here (100 for OpenAI's ViTs).
    logit_scale: float = 100.0


@dataclass
class ProposalConfig:
    """MaskFormer-style proposal generator on a timm backbone."""

    backbone: str = "resnet101c"
    backbone_kwargs: dict[str, Any] = field(default_factory=lambda: {"stem_width": 64})
    conv_dim: int = 256
    mask_dim: int = 256
    hidden_dim: int = 256
    num_queries: int = 100
    num_heads: int = 8
    dim_feedforward: int = 2048
    dec_layers: int = 6
    dropout: float = 0.1
    norm_groups: int = 32
    # Class head (MLP hidden_dim -> class_hidden -> text dim, cosine with text): used to
    # train the proposals (matching), ignored by DeOP at inference.
    class_hidden: int = 1024


@dataclass
class AnchorConfig:
    """Classification anchor learning (CAL): decoder + heatmap pooling."""

    num_heads: int = 8
    dim_feedforward: int = 1024
    dropout: float = 0.1
    # "cal": learned anchors + heatmap pooling; "mask_average": average of CLIP features
    # inside each soft mask (an ablation / training-free fallback).
    pooling: str = "cal"
    logit_scale: float = 100.0


@dataclass
class TextConfig:
    """How class names become text embeddings.

    ``templates``: "single" ("a photo of a {}."), "imagenet80" (the 80-template
    ensemble), or an explicit list of format strings with one ``{}``.
    ``prompt_length`` > 0 adds learned prompt context vectors (CoOp).
    """

    templates: str | list[str] = "single"
    prompt_length: int = 0


@dataclass
class ModelConfig:
    """A whole segmenter: family + parts. Serialised as ``config.json``."""

    family: str = "deop"
    name: str = ""
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    clip: ClipConfig = field(default_factory=ClipConfig)
    proposals: ProposalConfig = field(default_factory=ProposalConfig)
    anchors: AnchorConfig = field(default_factory=AnchorConfig)
    text: TextConfig = field(default_factory=TextConfig)
    format_version: int = 1

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"unknown model family {self.family!r}; expected one of {FAMILIES}")
        if self.clip.severance not in SEVERANCE_VARIANTS:
            raise ValueError(
                f"unknown severance {self.clip.severance!r}; expected one of {SEVERANCE_VARIANTS}"
            )

    # -- serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        data = copy.deepcopy(data)
        parts = {
            "preprocess": PreprocessConfig,
            "clip": ClipConfig,
            "proposals": ProposalConfig,
            "anchors": AnchorConfig,
            "text": TextConfig,
        }
        kwargs: dict[str, Any] = {}
        for key, value in data.items():
            if key in parts:
                kwargs[key] = _build(parts[key], value)
            elif key in {f.name for f in dataclasses.fields(cls)}:
                kwargs[key] = value
            else:
                raise ValueError(f"unknown config key {key!r}")
        return cls(**kwargs)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> ModelConfig:
        try:
            data = json.loads(Path(path).read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not a valid JSON config ({err})") from err
        return cls.from_dict(data)

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with nested fields changed: ``cfg.replace(**{"clip.severance": "none"})``."""
        out = copy.deepcopy(self)
        for dotted, value in changes.items():
            target: Any = out
            *parents, last = dotted.split(".")
            for name in parents:
                target = getattr(target, name)
            if not hasattr(target, last):
                raise ValueError(f"unknown config field {dotted!r}")
            setattr(target, last, value)
        out.__post_init__()
        return out


def _build(part_cls: type, value: Any) -> Any:
    if isinstance(value, part_cls):
        return value
    if not isinstance(value, dict):
        raise ValueError(f"config section for {part_cls.__name__} must be a dict")
    names = {f.name: f for f in dataclasses.fields(part_cls)}
    unknown = set(value) - set(names)
    if unknown:
        raise ValueError(f"unknown keys in {part_cls.__name__}: {sorted(unknown)}")
    kwargs = {}
    for key, item in value.items():
        # JSON has no tuples; restore them where the dataclass default is a tuple.
        default = names[key].default
        if isinstance(default, tuple) and isinstance(item, list):
            item = tuple(item)
        kwargs[key] = item
    return part_cls(**kwargs)


# -- presets ------------------------------------------------------------------------------

# A tiny CLIP for tests: standard open_clip ViT + text tower at toy widths.
TINY_CLIP_CFG: dict[str, Any] = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 32, "patch_size": 16, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def _deop_vit_b16() -> ModelConfig:
    return ModelConfig(family="deop", name="deop-vit-b16")


def _deop_tiny() -> ModelConfig:
    return ModelConfig(
        family="deop",
        name="deop-tiny",
        preprocess=PreprocessConfig(short_side=64, max_long_side=256, pad_multiple=32),
        clip=ClipConfig(
            model_name="tiny",
            model_cfg=copy.deepcopy(TINY_CLIP_CFG),
            learned_pos_grid=4,
            learned_pos_blocks=(1,),
            severance="weighted",
            severance_blocks=(1,),
        ),
        proposals=ProposalConfig(
            backbone="resnet18",
            backbone_kwargs={"channels": [8, 16, 32, 64], "stem_width": 8},
            conv_dim=16,
            mask_dim=16,
            hidden_dim=16,
            num_queries=6,
            num_heads=2,
            dim_feedforward=32,
            dec_layers=2,
            norm_groups=4,
            class_hidden=32,
        ),
        anchors=AnchorConfig(num_heads=2, dim_feedforward=32),
        text=TextConfig(templates="single", prompt_length=0),
    )


PRESET_CONFIGS = {"deop-vit-b16": _deop_vit_b16, "deop-tiny": _deop_tiny}


def preset_config(name: str) -> ModelConfig:
    try:
        return PRESET_CONFIGS[name]()
    except KeyError:
        raise ValueError(
            f"unknown preset {name!r}; presets: {sorted(PRESET_CONFIGS)}"
        ) from None
