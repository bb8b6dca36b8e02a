"""Write shapes-world scenes as a dataset folder in the library's format.

Layout::

    root/
      classes.txt          one class name per line, line i = class id i (CLASS_NAMES order)
      images/<stem>.png    RGB
      masks/<stem>.png     8-bit class ids, 255 = ignore

Command line::

    python -m onepass_ovs.toy.export --output DIR --num N --seed S [--train-labels]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from . import scenes

__all__ = ["export_folder"]

_CHUNK = 256


def export_folder(
    root: str | Path,
    n: int,
    seed: int,
    size: int = scenes.REFERENCE_SIZE,
    split_unseen: bool = False,
) -> Path:
    """Render ``n`` scenes of stream ``seed`` into ``root`` (created if missing).

    Args:
        root: output folder.
        n: number of scenes; stems are zero-padded indices ``000000`` ... .
        seed: scene stream (see :func:`scenes.render_scenes`); the same ``(seed, i)``
            always gives the same scene ``i``.
        size: image side in pixels.
        split_unseen: write segmentation-training labels, i.e. unseen-class pixels
            become 255 (ignore). ``False`` writes the clean labels used for evaluation.

    Returns:
        ``root`` as a :class:`~pathlib.Path`.
    """
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text("\n".join(scenes.CLASS_NAMES) + "\n")
    width = max(6, len(str(max(n - 1, 0))))
    for start in range(0, n, _CHUNK):
        batch = scenes.render_scenes(seed, min(_CHUNK, n - start), size, start=start)
        labels = scenes.training_label(batch.labels) if split_unseen else batch.labels
        for k in range(len(batch)):
            stem = f"{start + k:0{width}d}"
            Image.fromarray(batch.images[k]).save(root / "images" / f"{stem}.png")
            # Class ids fit in 8 bits here (31 classes + 255 ignore); PNG keeps them lossless.
            mask = labels[k].astype(np.uint8)
            Image.fromarray(mask).save(root / "masks" / f"{stem}.png")
    return root


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Export shapes-world scenes as a dataset folder.")
    parser.add_argument("--output", required=True, help="dataset folder to write")
    parser.add_argument("--num", type=int, required=True, help="number of scenes")
    parser.add_argument("--seed", type=int, default=0, help="scene stream seed")
    parser.add_argument("--size", type=int, default=scenes.REFERENCE_SIZE, help="image side (px)")
    parser.add_argument(
        "--train-labels",
        action="store_true",
        help="mark unseen-class pixels 255 (ignore), as for segmentation training",
    )
    args = parser.parse_args(argv)
    root = export_folder(args.output, args.num, args.seed, args.size, split_unseen=args.train_labels)
    print(f"wrote {args.num} scenes to {root}")


if __name__ == "__main__":
    main()
