"""Fine-tune a DeOP model on your own data with the Python API, end to end.

Runs on a CPU in about a minute: it writes a small synthetic dataset (coloured
rectangles, folder format), trains the tiny preset's proposal generator (stage 2), then
DeOP's heads (stage 3), evaluates, and segments one image with the result.

    python examples/finetune.py --workdir runs/finetune-demo

For real data point ``--data`` at a folder with ``classes.txt``, ``images/`` and
``masks/`` and start from a real model (``--model deop-vit-b16`` plus CLIP weights,
see docs/training.md); the paper's settings are ``default_config(stage)`` unchanged.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from onepass_ovs import Segmenter
from onepass_ovs.data import FolderDataset
from onepass_ovs.evaluation import evaluate
from onepass_ovs.training import default_config, train_deop, train_proposals
from onepass_ovs.training.augment import SegmentationAugment

CLASSES = ["background", "red box", "green box", "blue box", "yellow box"]
COLOURS = [(220, 40, 40), (40, 170, 60), (40, 80, 220), (230, 210, 40)]


def write_dataset(root: Path, n: int = 16, size: int = 64, seed: int = 0) -> Path:
    """``n`` images of 2-3 solid rectangles on a noisy grey background, with masks."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    rng = np.random.default_rng(seed)
    for index in range(n):
        image = np.clip(rng.integers(90, 150) + rng.normal(0, 8, (size, size, 3)), 0, 255)
        label = np.zeros((size, size), dtype=np.uint8)  # 0 = background; 255 would be ignore
        for class_id in rng.permutation([1, 2, 3, 4])[: rng.integers(2, 4)]:
            h, w = rng.integers(size // 4, size // 2, 2)
            top, left = rng.integers(0, size - h), rng.integers(0, size - w)
            image[top : top + h, left : left + w] = COLOURS[class_id - 1]
            label[top : top + h, left : left + w] = class_id
        Image.fromarray(image.astype(np.uint8)).save(root / "images" / f"{index:03d}.png")
        Image.fromarray(label).save(root / "masks" / f"{index:03d}.png")
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("runs/finetune-demo"))
    parser.add_argument("--data", type=Path, help="your dataset folder (default: generated)")
    parser.add_argument("--model", default="deop-tiny", help="preset or pretrained folder")
    parser.add_argument("--proposal-steps", type=int, default=350)
    parser.add_argument("--deop-steps", type=int, default=200)
    args = parser.parse_args()

    data = args.data or write_dataset(args.workdir / "data")
    dataset = FolderDataset(data)
    if args.model == "deop-tiny":
        segmenter = Segmenter.from_config("deop-tiny", device="cpu", seed=0)
    else:
        segmenter = Segmenter.from_pretrained(args.model)
    print(f"mIoU before training: {evaluate(segmenter, dataset, progress=False)['miou']:.1f}")

    # The tiny preset starts from random weights, so it gets a much higher lr than the
    # paper's (which fine-tunes pretrained backbones), no gradient clipping, no backbone
    # lr cut, and crops without rescaling: the goal here is to fit 16 images quickly.
    crops = SegmentationAugment(64, short_side=(64, 64))
    common = {"batch_size": 4, "num_workers": 0, "log_every": 25, "grad_clip_norm": None}
    segmenter = train_proposals(
        segmenter,
        dataset,
        default_config(
            "proposals", steps=args.proposal_steps, lr=1e-2, warmup_steps=20,
            lr_multipliers={"proposals.backbone": 1.0},
            output_dir=str(args.workdir / "proposals"), **common,
        ),
        augment=crops,
    )  # fmt: skip
    # A random CLIP has no image-text alignment to keep frozen: train its image tower too.
    segmenter = train_deop(
        segmenter,
        dataset,
        default_config("deop", steps=args.deop_steps, lr=3e-3,
                       output_dir=str(args.workdir / "deop"), **common),
        augment=crops,
        clip_lr_mult=1.0,
    )  # fmt: skip

    result = evaluate(segmenter, dataset, progress=False)
    print(f"mIoU after training: {result['miou']:.1f}")
    for name, iou in result["per_class"].items():
        print(f"  {name:<12} {iou:5.1f}")

    # The output folder is an ordinary pretrained model.
    model = Segmenter.from_pretrained(args.workdir / "deop", device="cpu")
    first_image = sorted((Path(data) / "images").iterdir())[0]
    segmentation = model.segment(first_image, dataset.classes)
    segmentation.save(args.workdir / "segmentation.png")
    print(f"classes in {first_image.name}: {segmentation.fractions()}")
    print(f"model: {args.workdir / 'deop'}  (ovs-segment IMAGE --model {args.workdir / 'deop'})")


if __name__ == "__main__":
    main()
