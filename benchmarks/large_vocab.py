"""Per-image cost of large vocabularies on the demo model, with the text already encoded.

    python benchmarks/large_vocab.py                  # 20, 847 and 3000 classes
    python benchmarks/large_vocab.py --classes 20 3000 --repeat 5 --threads 1

Each vocabulary size runs in its own process (so peak RSS, VmHWM, is its own): the
vocabulary is encoded once (timed apart), then the same images are segmented ``repeat``
times and the median per-image wall time is reported, with the part spent building the
label map (upsampling + argmax in ``SegmentationResult``). Targets (issue 12): 847 classes
cost at most 1.5x and 3000 classes at most 2x the 20-class time per image.

Vocabularies: the demo's shape classes first (all 20 of the smallest vocabulary), then ImageNet class names (open_clip's
list), then "<colour> <ImageNet name>" variants to reach 3000. Images: the README's
128 x 128 shapes scene and a 480 x 640 enlargement of it (the label map is made at the
input's size, so a larger input is where a large vocabulary used to cost most).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCENE = ROOT / "examples" / "shapes_scene.png"
COLOURS = ["red", "green", "blue", "yellow", "black", "white", "small", "large"]


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MiB (VmHWM; ru_maxrss as a fallback)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


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


def run_case(size: int, repeat: int, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    from onepass_ovs import Segmenter
    from onepass_ovs.result import SegmentationResult

    seg = Segmenter.from_pretrained("demo", device="cpu")
    vocab = vocabulary(size)
    start = time.perf_counter()
    seg.encode_text(vocab)
    text_s = time.perf_counter() - start

    # time the label map inside segment(): wrap SegmentationResult's builder
    label_time = [0.0]
    build = SegmentationResult._label_map

    def timed_build(self):
        begin = time.perf_counter()
        try:
            return build(self)
        finally:
            label_time[0] += time.perf_counter() - begin

    SegmentationResult._label_map = timed_build
    out = {"classes": size, "text_s": text_s, "images": {}}
    for name, image in images().items():
        seg.segment(image, vocab)  # warm-up
        totals, labels = [], []
        for _ in range(repeat):
            label_time[0] = 0.0
            begin = time.perf_counter()
            seg.segment(image, vocab)
            totals.append(time.perf_counter() - begin)
            labels.append(label_time[0])
        out["images"][name] = {
            "per_image_s": statistics.median(totals),
            "label_map_s": statistics.median(labels),
        }
    out["peak_rss_mb"] = peak_rss_mb()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--classes", type=int, nargs="+", default=[20, 847, 3000])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--case", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case is not None:
        print(json.dumps(run_case(args.case, args.repeat, args.threads)))
        return

    rows = []
    for size in args.classes:
        command = [sys.executable, __file__, "--case", str(size), "--repeat", str(args.repeat),
                   "--threads", str(args.threads)]
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    base = rows[0]
    print(f"demo model, CPU, {args.threads} thread(s), median of {args.repeat}; text encoded "
          "beforehand (time shown apart)")
    header = f"{'classes':>7}  {'image':>8}  {'per image':>10}  {'label map':>10}  {'ratio':>6}  "
    header += f"{'text (once)':>11}  {'peak RSS':>9}"
    print(header)
    for row in rows:
        for name, timing in row["images"].items():
            ratio = timing["per_image_s"] / base["images"][name]["per_image_s"]
            print(f"{row['classes']:>7}  {name:>8}  {timing['per_image_s']:>9.3f}s  "
                  f"{timing['label_map_s']:>9.3f}s  {ratio:>5.2f}x  {row['text_s']:>10.2f}s  "
                  f"{row['peak_rss_mb']:>7.0f}MB")
    targets = {847: 1.5, 3000: 2.0}
    for row in rows:
        if row["classes"] in targets:
            worst = max(
                t["per_image_s"] / base["images"][n]["per_image_s"] for n, t in row["images"].items()
            )
            verdict = "met" if worst <= targets[row["classes"]] else "NOT met"
            print(f"target {row['classes']} classes <= {targets[row['classes']]}x "
                  f"{base['classes']}-class time: {verdict} (worst {worst:.2f}x)")


if __name__ == "__main__":
    main()
