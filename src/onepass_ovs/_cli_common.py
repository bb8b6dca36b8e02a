"""Helpers shared by the ``ovs-train`` and ``ovs-eval`` command lines: one-line errors,
comma-separated names, opening the dataset and loading the model named on the command
line."""

from __future__ import annotations

from pathlib import Path
from typing import NoReturn

import typer

__all__ = ["fail", "load_segmenter", "open_dataset", "parse_names"]


def fail(message: str) -> NoReturn:
    """Print ``error: message`` to stderr and exit with status 2."""
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)


def parse_names(text: str | None) -> list[str] | None:
    """``"a, b ,c"`` -> ``["a", "b", "c"]``; None or blank -> None."""
    if text is None:
        return None
    names = [name.strip() for name in text.split(",") if name.strip()]
    return names or None


def open_dataset(data: Path | None, coco_stuff: Path | None, split: str, unseen: list[str] | None):
    """The FolderDataset (or CocoStuffDataset) named on the command line, checked."""
    from .data import CocoStuffDataset, DatasetError, FolderDataset

    if (data is None) == (coco_stuff is None):
        fail("give exactly one of --data DIR and --coco-stuff ROOT")
    try:
        if data is not None:
            if not data.is_dir():
                fail(f"dataset folder not found: {data}")
            dataset = FolderDataset(data, unseen=unseen)
        else:
            dataset = CocoStuffDataset(coco_stuff, split, unseen=unseen)
        dataset.load(0)  # surface unreadable files now, not inside a loader worker
    except (DatasetError, ValueError) as err:
        fail(str(err))
    return dataset


def load_segmenter(name: str, *, seed: int = 0, device: str | None = None):
    """A preset name -> random init (seeded); anything else -> ``from_pretrained``."""
    from . import ModelNotAvailableError, Segmenter
    from .models.registry import list_presets

    try:
        if name in list_presets():
            return Segmenter.from_config(name, device=device, seed=seed)
        return Segmenter.from_pretrained(name, device=device)
    except ModelNotAvailableError as err:
        fail(str(err))
    except ValueError as err:
        fail(f"cannot load model {name!r}: {err}")
