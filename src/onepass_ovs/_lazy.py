"""Packages whose public names load from their submodules on first access (PEP 562)."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(
    package: str, namespace: dict[str, Any], modules: Mapping[str, tuple[str, ...]]
) -> tuple[Callable[[str], Any], Callable[[], list[str]], list[str]]:
    """``(__getattr__, __dir__, names)`` for ``package``, whose globals are ``namespace``.

    ``modules`` maps a submodule to the names it provides; the first access to a name
    imports its submodule and caches the value in ``namespace``.
    """
    name_to_module = {name: module for module, names in modules.items() for name in names}

    def __getattr__(name: str) -> Any:
        module = name_to_module.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{module}"), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(name_to_module))

    return __getattr__, __dir__, sorted(name_to_module)
