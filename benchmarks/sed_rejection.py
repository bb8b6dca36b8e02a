"""Category early rejection on a trained SED, side by side: CER on vs off at a large vocabulary.

    python benchmarks/sed_rejection.py                         # demo-sed, 847 names, 100 scenes
    python benchmarks/sed_rejection.py --num 8 --repeat-scenes 4   # a quick run

The vocabulary is the shapes world's 31 names followed by other names (ImageNet classes,
then coloured ImageNet classes, as ``benchmarks/large_vocab.py``) up to ``--classes``.
Fresh scenes (a seed no training or other evaluation uses) are segmented with that whole
vocabulary by the same weights twice, with the model's ``rejection_top_k`` and with 0
(no rejection), alternating image by image so both see the same machine load. Printed:
median time per image, peak RSS of a separate process per mode (it loads the model and
segments the timed scenes), and mIoU over the 31 shapes-world classes (a pixel labelled
with any other name is wrong), seen / unseen / hIoU. Text is encoded once per vocabulary
before timing.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from _common import parser_from_doc, peak_rss_mb

SCENE_SEED_OFFSET = 2  # EVAL_SEED + 2: used by nothing else


def load(model: str, top_k: int | None):
    """The model, with ``sed.rejection_top_k`` set to ``top_k`` (None: as saved)."""
    from onepass_ovs import Segmenter

    seg = Segmenter.from_pretrained(model, device="cpu")
    if top_k is None or top_k == seg.config.family_config.rejection_top_k:
        return seg
    other = Segmenter.from_config(seg.config.replace(**{"sed.rejection_top_k": top_k}), device="cpu")
    other.model.load_state_dict(seg.model.state_dict())
    return other


def scenes_and_labels(num: int) -> list[tuple[np.ndarray, np.ndarray]]:
    from onepass_ovs.toy import scenes
    from onepass_ovs.toy.build import EVAL_SEED

    batch = scenes.render_scenes(EVAL_SEED + SCENE_SEED_OFFSET, num)
    return list(zip(batch.images, batch.labels, strict=True))


def miou_31(predictions: list[np.ndarray], labels: list[np.ndarray]) -> dict:
    """Seen / unseen mIoU and hIoU (percent) over the 31 shapes-world classes; predicted ids
    >= 31 (other names) are wrong for every ground-truth pixel."""
    from onepass_ovs.toy import scenes

    k = len(scenes.CLASS_NAMES)
    inter, union = np.zeros(k), np.zeros(k)
    for pred, label in zip(predictions, labels, strict=True):
        for c in range(k):
            p, g = pred == c, label == c
            inter[c] += np.logical_and(p, g).sum()
            union[c] += np.logical_or(p, g).sum()
    present = union > 0
    iou = np.where(present, inter / np.maximum(union, 1), np.nan) * 100
    unseen = np.array([n in scenes.UNSEEN_CLASSES for n in scenes.CLASS_NAMES])
    seen_m = float(np.nanmean(iou[~unseen]))
    unseen_m = float(np.nanmean(iou[unseen]))
    hiou = 2 * seen_m * unseen_m / (seen_m + unseen_m) if seen_m + unseen_m else 0.0
    return {"seen": seen_m, "unseen": unseen_m, "hiou": hiou}


def run_memory(model: str, top_k: int, classes: int, num: int) -> float:
    from large_vocab import vocabulary

    seg = load(model, top_k)
    vocab = vocabulary(classes)
    for image, _ in scenes_and_labels(num):
        seg.segment(image, vocab)
    return peak_rss_mb()


def main() -> None:
    parser = parser_from_doc(__doc__)
    parser.add_argument("--model", default="demo-sed")
    parser.add_argument("--classes", type=int, default=847)
    parser.add_argument("--num", type=int, default=100, help="fresh scenes for mIoU")
    parser.add_argument("--repeat-scenes", type=int, default=20,
                        help="scenes (the first of them) timed; each is timed once per mode")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--memory-of", type=int, default=None, help=argparse_hidden())
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_of is not None:
        print(json.dumps({"peak_rss_mb": run_memory(args.model, args.memory_of, args.classes,
                                                    args.repeat_scenes)}))  # fmt: skip
        return

    from large_vocab import vocabulary

    vocab = vocabulary(args.classes)
    saved = load(args.model, None)
    top_k = saved.config.family_config.rejection_top_k
    if top_k == 0:
        raise SystemExit(f"{args.model} has early rejection off (rejection_top_k = 0)")
    modes = {f"CER top-{top_k}": saved, "no CER": load(args.model, 0)}
    data = scenes_and_labels(args.num)
    for seg in modes.values():
        seg.segment(data[0][0], vocab)  # warm-up; encodes the vocabulary once
    times = {m: [] for m in modes}
    preds = {m: [] for m in modes}
    for i, (image, _) in enumerate(data):
        order = list(modes) if i % 2 == 0 else list(modes)[::-1]
        for mode in order:
            start = time.perf_counter()
            result = modes[mode].segment(image, vocab)
            elapsed = time.perf_counter() - start
            if i < args.repeat_scenes:
                times[mode].append(elapsed)
            preds[mode].append(np.asarray(result.label_map))
    labels = [label for _, label in data]

    peak = {}
    for mode, k in zip(modes, (top_k, 0), strict=True):
        done = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), "--model", args.model,
             "--classes", str(args.classes), "--repeat-scenes", str(args.repeat_scenes),
             "--memory-of", str(k), *(["--threads", str(args.threads)] if args.threads else [])],
            check=True, capture_output=True, text=True,
        )  # fmt: skip
        peak[mode] = json.loads(done.stdout.strip().splitlines()[-1])["peak_rss_mb"]

    print(f"# {args.model}, {args.classes} names (31 shapes-world + {args.classes - 31} others), "
          f"{args.num} fresh 128x128 scenes (mIoU), {args.repeat_scenes} timed per mode, "
          f"CPU threads={torch.get_num_threads()}")  # fmt: skip
    print("| mode | per image | peak RSS | seen mIoU | unseen mIoU | hIoU |")
    print("|---|---:|---:|---:|---:|---:|")
    medians = {}
    for mode in modes:
        medians[mode] = statistics.median(times[mode])
        m = miou_31(preds[mode], labels)
        print(f"| {mode} | {medians[mode] * 1000:.0f} ms | {peak[mode]:.0f} MiB | {m['seen']:.1f} | "
              f"{m['unseen']:.1f} | {m['hiou']:.1f} |")
    on, off = list(modes)
    same = np.mean([np.mean(a == b) for a, b in zip(preds[on], preds[off], strict=True)])
    print(f"\nCER speed-up: {medians[off] / medians[on]:.2f}x; label maps agree on "
          f"{same * 100:.2f}% of pixels")


def argparse_hidden() -> str:
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
