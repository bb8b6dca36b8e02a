"""Class lists: ``classes.txt``, synonyms (``"sofa, couch"``), unseen-class names.

Pure python: no torch, numpy or PIL.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

__all__ = [
    "DatasetError",
    "check_class_names",
    "class_synonyms",
    "read_class_names",
    "resolve_unseen",
]


class DatasetError(ValueError):
    """A dataset file is missing, unreadable or inconsistent; the message names it."""


def class_synonyms(name: str) -> list[str]:
    """Names of one class: ``"sofa, couch"`` -> ``["sofa", "couch"]``."""
    return [part.strip() for part in name.split(",") if part.strip()]


def read_class_names(path: str | os.PathLike) -> list[str]:
    """Class names from a ``classes.txt``, one per line, as written (stripped).

    Trailing blank lines are allowed; a blank line before the last class is an error
    because it would silently shift every following class id.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"class list not found: {path}")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise DatasetError(f"cannot read class list {path}: {err}") from err
    while lines and not lines[-1].strip():
        lines.pop()
    names = [line.strip() for line in lines]
    for line_no, name in enumerate(names, start=1):
        if not class_synonyms(name):
            raise DatasetError(f"{path}:{line_no}: empty class name")
    if not names:
        raise DatasetError(f"class list is empty: {path}")
    check_class_names(names, str(path))
    return names


def check_class_names(names: Sequence[str], where: str) -> None:
    """Raise :class:`DatasetError` (naming ``where``) when two classes share a synonym."""
    seen: dict[str, int] = {}
    for class_id, name in enumerate(names):
        for synonym in class_synonyms(name):
            key = synonym.lower()
            if key in seen and seen[key] != class_id:
                raise DatasetError(
                    f"{where}: name {synonym!r} used by class {seen[key]} and class {class_id}"
                )
            seen[key] = class_id


def resolve_unseen(class_names: Sequence[str], unseen: Iterable[str] | None) -> list[int]:
    """Sorted class ids of the ``unseen`` names (any synonym, case-insensitive).

    ``None`` gives ``[]``; a name that is not in ``class_names`` raises
    :class:`DatasetError`; a single string (not a list of names) raises ``TypeError``.
    """
    if unseen is None:
        return []
    if isinstance(unseen, str):
        raise TypeError("unseen must be an iterable of class names, not a single string")
    lookup: dict[str, int] = {}
    for class_id, name in enumerate(class_names):
        for synonym in class_synonyms(name):
            lookup[synonym.lower()] = class_id
    ids: set[int] = set()
    for name in unseen:
        key = name.strip().lower()
        if key not in lookup:
            raise DatasetError(f"unseen class {name!r} is not in the class list")
        ids.add(lookup[key])
    return sorted(ids)
