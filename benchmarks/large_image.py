"""Segment a 3000 x 2000 photo on CPU: wall time and peak memory per model and policy.

    python benchmarks/large_image.py                 # every case, one subprocess each
    python benchmarks/large_image.py --case clip     # one case in this process

Cases (random weights: speed and memory do not depend on the values):

- ``deop``: deop-vit-b16 under the default resize policy (short side 512 -> 768 x 512,
  one pass);
- ``deop-original``: deop-vit-b16 at the photo's own size (``size="original"``): 3008 x
  2016 in 12 sliding windows of 1024;
- ``clip``: a ViT-B-16 training-free model, default policy (short side 448 -> 672 x 448,
  two windows of 448);
- ``clip-original``: the same at the photo's own size (3008 x 2000: 54 windows of 448).

Each case runs in its own process so peak RSS (VmHWM) is its own. Text encoding (the 80
templates per class for ``clip``) is timed apart: it happens once per vocabulary.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import peak_rss_mb

CASES = ("deop", "deop-original", "clip", "clip-original")
VOCABULARY = ["person", "car", "tree", "sky", "road, street", "building", "background"]
HEIGHT, WIDTH = 2000, 3000


def make_photo(path: Path) -> None:
    """A smooth synthetic 3000 x 2000 JPEG (decoding it is part of the measured work)."""
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float32)
    rgb = np.stack(
        [np.sin(x / 170.0), np.cos(y / 130.0), np.sin((x + y) / 250.0)], axis=-1
    )
    Image.fromarray(((rgb * 0.5 + 0.5) * 255).astype(np.uint8)).save(path, quality=90)


def run_case(case: str, photo: Path, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    from onepass_ovs import Segmenter
    from onepass_ovs.models.training_free import clip_model_config

    torch.manual_seed(0)
    start = time.perf_counter()
    if case.startswith("deop"):
        seg = Segmenter.from_config("deop-vit-b16", device="cpu")
    else:
        seg = Segmenter.from_config(clip_model_config("ViT-B-16"), device="cpu")
    build_s = time.perf_counter() - start
    start = time.perf_counter()
    seg.encode_text(VOCABULARY)
    text_s = time.perf_counter() - start
    size = "original" if case.endswith("original") else None
    start = time.perf_counter()
    result = seg.segment(photo, VOCABULARY, size=size)
    segment_s = time.perf_counter() - start
    assert result.label_map.shape == (HEIGHT, WIDTH)
    return {
        "case": case,
        "model": seg.config.name or seg.config.clip.model_name,
        "image": f"{WIDTH}x{HEIGHT}",
        "classes": len(VOCABULARY),
        "threads": threads,
        "build_s": round(build_s, 2),
        "text_s": round(text_s, 2),
        "segment_s": round(segment_s, 2),
        "peak_rss_mb": round(peak_rss_mb(), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=CASES, help="run one case in this process")
    parser.add_argument("--photo", type=Path, help="image to segment (default: synthetic)")
    parser.add_argument("--threads", type=int, default=min(os.cpu_count() or 1, 16))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        photo = args.photo
        if photo is None:
            photo = Path(tmp) / "photo.jpg"
            make_photo(photo)
        if args.case:
            print(json.dumps(run_case(args.case, photo, args.threads)))
            return
        for case in CASES:
            command = [sys.executable, __file__, "--case", case, "--photo", str(photo),
                       "--threads", str(args.threads)]
            out = subprocess.run(command, check=True, capture_output=True, text=True)
            row = json.loads(out.stdout.strip().splitlines()[-1])
            print(
                f"{row['case']:>14}: segment {row['segment_s']:7.1f} s  "
                f"text {row['text_s']:6.1f} s  peak RSS {row['peak_rss_mb'] / 1024:5.2f} GiB  "
                f"({row['threads']} threads)",
                flush=True,
            )


if __name__ == "__main__":
    main()
