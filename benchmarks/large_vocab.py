"""Per-image cost of large vocabularies on the demo model, with the text already encoded.

    python benchmarks/large_vocab.py                  # 20, 847 and 3000 classes
    python benchmarks/large_vocab.py --classes 20 3000 --repeat 5 --threads 1

Times: one process encodes every vocabulary once (timed apart), then segments the same
images with each vocabulary in turn, ``repeat`` rounds (round-robin, so a busy machine
slows every size alike); the median per-image wall time is reported, with the part spent
building the label map (upsampling + argmax in ``SegmentationResult``). Peak RSS (VmHWM):
one process per vocabulary size that loads the model, encodes and segments. Targets (issue 12): 847 classes
cost at most 1.5x and 3000 classes at most 2x the 20-class time per image.

Vocabularies: the demo's shape classes first (all 20 of the smallest vocabulary), then ImageNet class names (open_clip's
list), then "<colour> <ImageNet name>" variants to reach 3000. Images: the README's
128 x 128 shapes scene and a 480 x 640 enlargement of it (the label map is made at the
input's size, so a larger input is where a large vocabulary used to cost most).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _common import parser_from_doc, peak_rss_mb

ROOT = Path(__file__).resolve().parents[1]
SCENE = ROOT / "examples" / "shapes_scene.png"
COLOURS = ["red", "green", "blue", "yellow", "black", "white", "small", "large"]


def vocabulary(size: int) -> list[str]:
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    from onepass_ovs.toy.scenes import CLASS_NAMES

    names = list(CLASS_NAMES[:size])
    seen = {n.lower() for n in names}
    pools = [list(IMAGENET_CLASSNAMES)] + [
        [f"{colour} {name}" for name in IMAGENET_CLASSNAMES] for colour in COLOURS
    ]
    for pool in pools:
        for name in pool:
            if len(names) == size:
                return names
            key = name.lower()
            if key not in seen and "," not in name:
                seen.add(key)
                names.append(name)
    if len(names) < size:
        raise SystemExit(f"cannot make {size} distinct class names")
    return names


def images():
    import numpy as np
    from PIL import Image

    scene = Image.open(SCENE).convert("RGB")
    return {
        "128x128": np.asarray(scene),
        "480x640": np.asarray(scene.resize((640, 480), Image.BILINEAR)),
    }


def _timed_label_maps():
    """Wrap SegmentationResult._label_map to add its time to a counter; returns the counter."""
    from onepass_ovs.result import SegmentationResult

    spent = [0.0]
    build = SegmentationResult._label_map

    def timed_build(self):
        begin = time.perf_counter()
        try:
            return build(self)
        finally:
            spent[0] += time.perf_counter() - begin

    SegmentationResult._label_map = timed_build
    return spent


def run_timing(sizes: list[int], repeat: int, threads: int) -> dict:
    """Per-image times of every vocabulary size, measured round-robin in one process (so
    a busy machine slows every size alike and the ratios stay meaningful)."""
    import torch

    torch.set_num_threads(threads)
    from onepass_ovs import Segmenter

    seg = Segmenter.from_pretrained("demo", device="cpu")
    vocabularies, text_s = {}, {}
    for size in sizes:
        vocabularies[size] = vocabulary(size)
        start = time.perf_counter()
        seg.encode_text(vocabularies[size])
        text_s[size] = time.perf_counter() - start
    spent = _timed_label_maps()
    pictures = images()
    totals = {(size, name): [] for size in sizes for name in pictures}
    labels = {key: [] for key in totals}
    for size in sizes:  # warm-up
        for image in pictures.values():
            seg.segment(image, vocabularies[size])
    for _ in range(repeat):
        for size in sizes:
            for name, image in pictures.items():
                spent[0] = 0.0
                begin = time.perf_counter()
                seg.segment(image, vocabularies[size])
                totals[size, name].append(time.perf_counter() - begin)
                labels[size, name].append(spent[0])
    return {
        str(size): {
            "text_s": text_s[size],
            "images": {
                name: {
                    "per_image_s": statistics.median(totals[size, name]),
                    "label_map_s": statistics.median(labels[size, name]),
                }
                for name in pictures
            },
        }
        for size in sizes
    }


def run_memory(size: int) -> float:
    """Peak RSS (MiB) of a process that loads the demo model, encodes a vocabulary of
    ``size`` classes and segments both images."""
    from onepass_ovs import Segmenter

    seg = Segmenter.from_pretrained("demo", device="cpu")
    vocab = vocabulary(size)
    for image in images().values():
        seg.segment(image, vocab)
    return peak_rss_mb()


def main() -> None:
    parser = parser_from_doc(__doc__)
    parser.add_argument("--classes", type=int, nargs="+", default=[20, 847, 3000])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--memory-of", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_of is not None:
        import torch

        torch.set_num_threads(args.threads)
        print(json.dumps({"peak_rss_mb": run_memory(args.memory_of)}))
        return

    peak = {}
    for size in args.classes:  # one process per size: its own peak RSS
        command = [sys.executable, __file__, "--memory-of", str(size), "--threads", str(args.threads)]
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        peak[size] = json.loads(done.stdout.strip().splitlines()[-1])["peak_rss_mb"]
    timing = run_timing(args.classes, args.repeat, args.threads)
    base_size = args.classes[0]
    base = timing[str(base_size)]
    print(f"demo model, CPU, {args.threads} thread(s), median of {args.repeat} (sizes timed "
          "round-robin in one process); text encoded beforehand (time shown apart)")
    header = f"{'classes':>7}  {'image':>8}  {'per image':>10}  {'label map':>10}  {'ratio':>6}  "
    header += f"{'text (once)':>11}  {'peak RSS':>9}"
    print(header)
    for size in args.classes:
        row = timing[str(size)]
        for name, t in row["images"].items():
            ratio = t["per_image_s"] / base["images"][name]["per_image_s"]
            print(f"{size:>7}  {name:>8}  {t['per_image_s']:>9.3f}s  {t['label_map_s']:>9.3f}s  "
                  f"{ratio:>5.2f}x  {row['text_s']:>10.2f}s  {peak[size]:>7.0f}MB")
    targets = {847: 1.5, 3000: 2.0}
    for size in args.classes:
        if size in targets and size != base_size:
            worst = max(
                t["per_image_s"] / base["images"][n]["per_image_s"]
                for n, t in timing[str(size)]["images"].items()
            )
            verdict = "met" if worst <= targets[size] else "NOT met"
            print(f"target: {size} classes <= {targets[size]}x the {base_size}-class time per image: "
                  f"{verdict} (worst {worst:.2f}x)")


if __name__ == "__main__":
    main()
