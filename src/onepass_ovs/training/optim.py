"""Optimizer parameter groups (per-module lr multipliers, no decay where it hurts) and the
optimizer of a :class:`~onepass_ovs.training.config.TrainConfig`."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .config import DEFAULT_NO_DECAY, TrainConfig

__all__ = ["DEFAULT_NO_DECAY", "build_optimizer", "param_groups"]

_NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.LocalResponseNorm,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)
_EMBEDDING_TYPES: tuple[type[nn.Module], ...] = (nn.Embedding, nn.EmbeddingBag)


def _fragment_matches(name: str, fragments: Sequence[str]) -> bool:
    # Whole-word-ish matching: a plain substring test would exempt "ln_post" or
    # "decompose" through "pos"; numbered/plural forms ("norm1", "embeddings") still hit.
    patterns = [re.compile(rf".*{re.escape(f)}(?:s|\d*)") for f in fragments]
    for component in name.split("."):
        for word in {component, *component.split("_")}:
            if any(pattern.fullmatch(word) for pattern in patterns):
                return True
    return False


def param_groups(
    model: nn.Module,
    base_lr: float,
    weight_decay: float,
    *,
    lr_multipliers: Mapping[str, float] | None = None,
    no_decay: Sequence[str] = DEFAULT_NO_DECAY,
) -> list[dict[str, Any]]:
    """Optimizer parameter groups: per-prefix lr multipliers, no decay where it hurts.

    Only trainable parameters (``requires_grad``) are included. A parameter gets no
    weight decay when its owning module is a normalisation or embedding layer, when its
    leaf name is ``bias``, or when a fragment of ``no_decay`` ends one of its dotted name
    components or ``_``-separated words, optionally followed by digits or an "s":
    "norm" matches ``norm1.weight`` and ``layernorm.weight``, "pos" matches
    ``query_pos`` and ``pos_embed`` but not ``ln_post`` or ``position``, "embedding"
    matches ``class_embedding``. ``lr_multipliers`` maps module-name prefixes
    (``"backbone"`` matches ``backbone.*``) to multipliers; the longest matching prefix
    wins, default 1.

    Returns one group per (multiplier, decay) pair, each a dict with ``params``,
    ``param_names``, ``lr`` (= base_lr * multiplier), ``base_lr`` (the same, which the
    trainer's schedule scales) and ``weight_decay``. Raises ValueError when a multiplier
    prefix names no parameter at all (a typo would otherwise train at the wrong lr).
    """
    lr_multipliers = dict(lr_multipliers or {})
    owner_is_exempt: dict[str, bool] = {}
    for module_name, module in model.named_modules():
        exempt = isinstance(module, _NORM_TYPES + _EMBEDDING_TYPES)
        for param_name, _ in module.named_parameters(prefix=module_name, recurse=False):
            owner_is_exempt[param_name] = exempt

    def prefix_of(name: str) -> str | None:
        matches = [p for p in lr_multipliers if name == p or name.startswith(p + ".")]
        return max(matches, key=len) if matches else None

    all_names = [name for name, _ in model.named_parameters()]
    unused = [p for p in lr_multipliers if not any(prefix_of(n) == p for n in all_names)]
    if unused:
        raise ValueError(f"lr_multipliers prefixes match no parameter: {unused}")

    groups: dict[tuple[float, bool], dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        prefix = prefix_of(name)
        multiplier = float(lr_multipliers[prefix]) if prefix is not None else 1.0
        decay = not (
            owner_is_exempt.get(name, False)
            or name.rsplit(".", 1)[-1] == "bias"
            or _fragment_matches(name, no_decay)
        )
        group = groups.setdefault(
            (multiplier, decay),
            {
                "params": [],
                "param_names": [],
                "lr": base_lr * multiplier,
                "base_lr": base_lr * multiplier,
                "lr_multiplier": multiplier,
                "weight_decay": weight_decay if decay else 0.0,
            },
        )
        group["params"].append(param)
        group["param_names"].append(name)
    return list(groups.values())


def build_optimizer(groups: list[dict[str, Any]], config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW (decoupled decay) or SGD with momentum (L2 decay) over ``groups``.

    A group without ``base_lr`` gets its ``lr`` (default ``config.lr``) as ``base_lr``.
    Raises ValueError when no group holds a parameter.
    """
    if not groups or not any(len(list(g["params"])) for g in groups):
        raise ValueError("the model has no trainable parameters")
    for group in groups:
        group.setdefault("base_lr", group.get("lr", config.lr))
    if config.optimizer == "adamw":
        return torch.optim.AdamW(
            groups,
            lr=config.lr,
            betas=config.betas,
            eps=config.eps,
            weight_decay=config.weight_decay,
        )
    return torch.optim.SGD(
        groups, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
    )
