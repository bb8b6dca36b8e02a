"""Model families and presets register here (timm-style); configs are parsed here.

A family declares itself from its own module::

    register_family("deop", build=DeOP, config_type=DeOPConfig, upgrade=_upgrade_v1)

    @register_preset
    def deop_tiny() -> ModelConfig: ...          # preset name: "deop-tiny"

:func:`build_model`, :func:`list_presets` and :func:`config_from_dict` read the registry,
so adding a family touches its own module and its presets, nothing central. Every module
of :mod:`onepass_ovs.models` is imported once on first use of the registry, which is how
the families get registered (their heavy dependencies are imported lazily, so this is
cheap).
"""

from __future__ import annotations

import copy
import importlib
import json
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from ..config import (
    FORMAT_VERSION,
    ClipConfig,
    ConfigError,
    ModelConfig,
    PreprocessConfig,
    TextConfig,
    parse_section,
)


@dataclass(frozen=True)
class Family:
    """A registered model family.

    ``build(config)`` returns a randomly initialised model (a
    :class:`~onepass_ovs.models.interface.SegmentationModel`); ``config_type`` is the
    dataclass of the family's own config section (None: the family has none);
    ``upgrade(data)`` rewrites a config dict saved by an earlier format version.
    """

    name: str
    build: Callable[[ModelConfig], nn.Module]
    config_type: type | None = None
    upgrade: Callable[[dict], dict] | None = None
    description: str = ""


_FAMILIES: dict[str, Family] = {}
_PRESETS: dict[str, Callable[[], ModelConfig]] = {}
_LOADED = False


def register_family(
    name: str,
    *,
    build: Callable[[ModelConfig], nn.Module],
    config_type: type | None = None,
    upgrade: Callable[[dict], dict] | None = None,
    description: str = "",
) -> Family:
    """Declare a family (called at import time of the family's module)."""
    if name in _FAMILIES and _FAMILIES[name].build is not build:
        raise ValueError(f"model family {name!r} is registered twice")
    family = Family(name, build, config_type, upgrade, description)
    _FAMILIES[name] = family
    return family


def register_preset(fn: Callable[[], ModelConfig]) -> Callable[[], ModelConfig]:
    """Decorator: a function returning a preset's ModelConfig; the preset is named after
    the function with ``_`` as ``-`` (``deop_vit_b16`` -> ``"deop-vit-b16"``)."""
    name = fn.__name__.replace("_", "-")
    if name in _PRESETS and _PRESETS[name] is not fn:
        raise ValueError(f"preset {name!r} is registered twice")
    _PRESETS[name] = fn
    return fn


def _load_families() -> None:
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    package = importlib.import_module("onepass_ovs.models")
    for module in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"onepass_ovs.models.{module.name}")


def families() -> dict[str, Family]:
    """The registered families by name."""
    _load_families()
    return dict(_FAMILIES)


def get_family(name: str) -> Family:
    _load_families()
    try:
        return _FAMILIES[name]
    except KeyError:
        raise ConfigError(
            f"unknown model family {name!r}; families: {sorted(_FAMILIES)}"
        ) from None


def list_presets() -> list[str]:
    """Architecture presets (random init) of every family, sorted."""
    _load_families()
    return sorted(_PRESETS)


def preset_config(name: str) -> ModelConfig:
    """A fresh ModelConfig of a preset."""
    _load_families()
    try:
        fn = _PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; presets: {sorted(_PRESETS)}") from None
    return fn()


def build_model(config: ModelConfig) -> nn.Module:
    """A randomly initialised model of the config's family. The config is not mutated:
    the model keeps its own (resolved) copy as ``model.config``."""
    return get_family(config.family).build(copy.deepcopy(config))


# -- parsing ------------------------------------------------------------------------------------

_SHARED = {"preprocess": PreprocessConfig, "clip": ClipConfig, "text": TextConfig}
# Without these a config cannot describe a model: building one from defaults would run at a
# resolution or with a CLIP the weights were never trained for.
_REQUIRED = ("family", "preprocess", "clip")


def config_from_dict(data: Any, where: str = "config") -> ModelConfig:
    """Parse a ``config.json`` dict (any format version) into a :class:`ModelConfig`.

    Every field is checked against its type and unknown keys are refused, so a bad config
    fails here, naming the field, rather than later inside the model.
    """
    if isinstance(data, ModelConfig):
        return copy.deepcopy(data)
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a JSON object, got {type(data).__name__}")
    data = copy.deepcopy(data)
    missing = [key for key in _REQUIRED if key not in data]
    if missing:
        raise ConfigError(
            f"{where} lacks {missing}: a model config needs its family, preprocessing and CLIP "
            "sections (start from a preset: Segmenter.from_config('<preset>').config.to_dict())"
        )
    family = get_family(_check_str(data["family"], f"{where}.family"))
    version = data.pop("format_version", 1)
    if not isinstance(version, int) or isinstance(version, bool):
        raise ConfigError(f"{where}.format_version must be an integer, got {version!r}")
    if version > FORMAT_VERSION:
        raise ConfigError(
            f"{where} has format version {version}; this onepass_ovs reads up to "
            f"{FORMAT_VERSION}: upgrade the package"
        )
    if version < FORMAT_VERSION and family.upgrade is not None:
        data = family.upgrade(data)
    kwargs: dict[str, Any] = {"family": family.name}
    for key, value in data.items():
        if key == "family":
            continue
        if key == "name":
            kwargs["name"] = _check_str(value, f"{where}.name")
        elif key in _SHARED:
            kwargs[key] = parse_section(_SHARED[key], value, f"{where}.{key}")
        elif key == family.name and family.config_type is not None:
            kwargs["family_config"] = parse_section(family.config_type, value, f"{where}.{key}")
        else:
            raise ConfigError(f"{where}: unknown key {key!r} for a {family.name!r} model")
    if family.config_type is not None and "family_config" not in kwargs:
        kwargs["family_config"] = family.config_type()
    return ModelConfig(**kwargs)


def load_config(path: str | Path) -> ModelConfig:
    """Read and check a ``config.json``."""
    try:
        data = json.loads(Path(path).read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: not a valid JSON config ({err})") from err
    return config_from_dict(data, where=str(path))


def _check_str(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{where} must be a string, got {value!r}")
    return value
