"""A tiny synthetic segmentation dataset for the stage, CLI and evaluation tests.

``write_rectangles(root, n)`` writes the folder format (``classes.txt``, ``images/``,
``masks/``): 64 x 64 images of a noisy grey background with two or three solid
rectangles of distinct colours; the mask holds the class of every pixel.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ["background", "red box", "green box", "blue box", "yellow box"]
COLOURS = {1: (220, 40, 40), 2: (40, 170, 60), 3: (40, 80, 220), 4: (230, 210, 40)}


def write_rectangles(root, n: int = 12, size: int = 64, seed: int = 0) -> Path:
    """Write ``n`` images + masks under ``root``; returns ``root``."""
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    rng = np.random.default_rng(seed)
    for index in range(n):
        grey = rng.integers(90, 150)
        image = np.clip(grey + rng.normal(0, 8, (size, size, 3)), 0, 255)
        label = np.zeros((size, size), dtype=np.uint8)
        for class_id in rng.permutation(list(COLOURS))[: rng.integers(2, 4)]:
            h, w = rng.integers(size // 4, size // 2, 2)
            top, left = rng.integers(0, size - h), rng.integers(0, size - w)
            image[top : top + h, left : left + w] = COLOURS[int(class_id)]
            label[top : top + h, left : left + w] = class_id
        Image.fromarray(image.astype(np.uint8)).save(root / "images" / f"img{index:03d}.png")
        Image.fromarray(label).save(root / "masks" / f"img{index:03d}.png")
    return root
