"""Model configurations: plain dataclasses that round-trip through ``config.json``.

A saved model is ``config.json`` + ``model.safetensors``; the config holds everything
needed to rebuild the architecture *and* to preprocess images the way the weights
expect (mean/std, resize policy), so transforms are derived from it, never hand-coded
at call sites.

:class:`ModelConfig` holds what every family shares (family, name, preprocessing, the
CLIP towers, the text side) plus ``family_config``, the family's own section (a
dataclass the family registers, see :mod:`onepass_ovs.models.registry`), stored in
``config.json`` under the family's name::

    {"family": "deop", "name": "...", "preprocess": {...}, "clip": {...}, "text": {...},
     "deop": {"proposals": {...}, "anchors": {...}}, "format_version": 2}

Parsing a dict into a ModelConfig needs the family's section type, so it lives with the
registry (:func:`onepass_ovs.models.registry.config_from_dict`); this module only knows
the shared sections and how to check a section against its dataclass.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

SEVERANCE_VARIANTS = ("weighted", "identity", "mask-guided", "clearclip", "none")
FORMAT_VERSION = 2


class ConfigError(ValueError):
    """A config that cannot describe a model: names the file or section and the field."""


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
    """The CLIP (open_clip) and how its image tower runs densely.

    ``model_cfg`` is open_clip's model config dict (``embed_dim``, ``vision_cfg``,
    ``text_cfg``, ``quick_gelu``, ...): stored in full so custom architectures travel with
    the weights. ``model_name`` names an open_clip config used when ``model_cfg`` is empty.
    The image tower's kind (open_clip ViT, ViT with a convolutional stem, timm ConvNeXt) is
    read from these fields by :mod:`onepass_ovs.models.towers`.
    """

    model_name: str = "ViT-B-16"
    model_cfg: dict[str, Any] = field(default_factory=dict)
    # A ViT whose patchify conv is replaced by a convolutional stem: the channels of its
    # 3x3 stride-2 convolutions (log2(patch) of them), then a 1x1 conv to the ViT width.
    # Empty: open_clip's patchify conv.
    conv_stem: tuple[int, ...] = ()
    # Learned extra positional tables (DeOP): a (1 + g*g, width) table added at the
    # input and one per listed block, bicubically interpolated to the feature grid.
    # learned_pos_grid = 0 turns them off.
    learned_pos_grid: int = 0
    learned_pos_blocks: tuple[int, ...] = ()
    severance: str = "none"
    severance_blocks: tuple[int, ...] = (-1,)
    # CLIP's logit scale (1 / temperature) for dense classifiers; loading a checkpoint
    # stores its own learned value here (100 for OpenAI's ViTs).
    logit_scale: float = 100.0

    def __post_init__(self) -> None:
        if self.severance not in SEVERANCE_VARIANTS:
            raise ConfigError(
                f"unknown severance {self.severance!r}; expected one of {SEVERANCE_VARIANTS}"
            )


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
    """A whole segmenter: family, shared parts, and the family's own section.

    Build one with a family's preset (``registry.preset_config("deop-tiny")``) or parse
    one with ``registry.config_from_dict``; serialised as ``config.json``.
    """

    family: str
    name: str = ""
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    clip: ClipConfig = field(default_factory=ClipConfig)
    text: TextConfig = field(default_factory=TextConfig)
    family_config: Any = None
    format_version: int = FORMAT_VERSION

    # -- serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "family": self.family,
            "name": self.name,
            "preprocess": dataclasses.asdict(self.preprocess),
            "clip": dataclasses.asdict(self.clip),
            "text": dataclasses.asdict(self.text),
        }
        if self.family_config is not None:
            out[self.family] = dataclasses.asdict(self.family_config)
        out["format_version"] = FORMAT_VERSION
        return out

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with nested fields changed: ``cfg.replace(**{"clip.severance": "none"})``.

        The family's section is reached as ``family_config.<field>`` or by the family's
        name (``"deop.anchors.pooling"``). Values are checked like a loaded config's.
        """
        out = copy.deepcopy(self)
        for dotted, value in changes.items():
            target: Any = out
            *parents, last = dotted.split(".")
            for name in parents:
                if target is out and name == out.family:
                    name = "family_config"
                target = getattr(target, name, None)
                if target is None or not dataclasses.is_dataclass(target):
                    raise ConfigError(f"unknown config field {dotted!r}")
            fields = {f.name for f in dataclasses.fields(target)}
            if last not in fields:
                raise ConfigError(f"unknown config field {dotted!r}")
            hint = typing.get_type_hints(type(target))[last]
            setattr(target, last, _check_value(value, hint, dotted))
            if hasattr(target, "__post_init__"):
                target.__post_init__()
        return out


# -- checking sections against their dataclasses ----------------------------------------------


def parse_section(part_cls: type, value: Any, where: str) -> Any:
    """A dataclass instance from a JSON section, every field checked against its type.

    ``where`` names the section in errors ("config.json: clip"). JSON lists become tuples
    where the field is a tuple; nested dataclass fields are parsed recursively; unknown
    keys and values of the wrong type (e.g. ``"512"`` for an int) raise :class:`ConfigError`.
    """
    if isinstance(value, part_cls):
        return value
    if not isinstance(value, dict):
        raise ConfigError(
            f"{where} must be a JSON object ({part_cls.__name__}), got {type(value).__name__}"
        )
    hints = typing.get_type_hints(part_cls)
    names = {f.name for f in dataclasses.fields(part_cls)}
    unknown = sorted(set(value) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown keys {unknown}; known: {sorted(names)}")
    kwargs = {}
    for key, item in value.items():
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = parse_section(hint, item, f"{where}.{key}")
        else:
            kwargs[key] = _check_value(item, hint, f"{where}.{key}")
    try:
        return part_cls(**kwargs)
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None


def _check_value(value: Any, hint: Any, where: str) -> Any:
    """``value`` converted to the field's type (lists -> tuples), or ConfigError."""
    ok, converted = _matches(value, hint)
    if not ok:
        raise ConfigError(
            f"{where} must be {_describe(hint)}, got {type(value).__name__} {value!r:.80}"
        )
    return converted


def _matches(value: Any, hint: Any) -> tuple[bool, Any]:
    if hint is Any:
        return True, value
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        for option in args:
            ok, converted = _matches(value, option)
            if ok:
                return True, converted
        return False, value
    if hint is type(None):
        return value is None, value
    if hint is bool:
        return isinstance(value, bool), value
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return ok, float(value) if ok else value
    if hint is str:
        return isinstance(value, str), value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            return False, value
        item_hint = args[0] if args else Any
        items = []
        for item in value:
            ok, converted = _matches(item, item_hint)
            if not ok:
                return False, value
            items.append(converted)
        return True, tuple(items) if origin is tuple else items
    if origin is dict or hint is dict:
        return isinstance(value, dict), value
    return isinstance(value, hint) if isinstance(hint, type) else True, value


def _describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(hint))
    if origin in (tuple, list):
        return f"a list of {_describe(typing.get_args(hint)[0])}"
    if origin is dict:
        return "an object"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(
        hint, getattr(hint, "__name__", str(hint))
    )
