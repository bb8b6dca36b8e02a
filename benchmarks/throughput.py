"""Images per second of every family, at batch 1 and 32, on whatever device this runs on.

    python benchmarks/throughput.py                       # GPU if there is one, 512 x 512
    python benchmarks/throughput.py --compile             # + torch.compile on the fast path
    python benchmarks/throughput.py --quick               # tiny presets, 64 px: a CPU smoke run

Random weights of the full-size presets (speed does not depend on what they learned):
deop-vit-b16, clip-vit-b16, sed-convnext-b, gkc-clip-rn50 (``--quick``: the -tiny ones).
For each family and batch size it measures

- ``fp32``: ``Segmenter.predict_labels`` (images already at the working size, on the
  device, label maps at the canvas resolution left on the device), the normal path;
- ``fast``: the same after ``Segmenter.optimize()`` (bf16 autocast on CUDA,
  channels-last, ``--compile`` adds torch.compile);
- ``segment``: the end-to-end ``Segmenter.segment`` on uint8 numpy images with the fast
  path (resize, label maps at full size on the CPU, result objects), ``batch_size`` = batch.

Each measurement runs one warm-up call, then timed calls until ``--iters`` or
``--max-seconds``; images/s = images / median call time. Rows print as they finish; the
table goes to ``--out`` (.json and .md). Out-of-memory is recorded, not fatal.
The end-to-end ``segment`` rows make full-size label maps on the CPU and dominate the
run time at batch 32; ``--modes fp32 fast`` leaves them out.
Target (issue 14): deop-vit-b16 at 512 x 512 on one H200 >= 500 images/s.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

FULL = {
    "deop": "deop-vit-b16",
    "clip": "clip-vit-b16",
    "sed": "sed-convnext-b",
    "gkc": "gkc-clip-rn50",
}
QUICK = {family: f"{family}-tiny" for family in FULL}
CLASSES = [
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "window", "grass",
    "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain",
    "chair", "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field",
]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--size", type=int, default=None, help="square side (default 512; quick 64)")
    parser.add_argument("--families", nargs="+", default=list(FULL), choices=list(FULL))
    parser.add_argument("--batches", nargs="+", type=int, default=None,
                        help="batch sizes (default 1 32; quick 1 4)")
    parser.add_argument("--classes", type=int, default=20)
    parser.add_argument("--modes", nargs="+", default=["fp32", "fast", "segment"],
                        choices=["fp32", "fast", "segment"])
    parser.add_argument("--compile", action="store_true", help="torch.compile on the fast path")
    parser.add_argument("--iters", type=int, default=None, help="timed calls at most (default 10)")
    parser.add_argument("--max-seconds", type=float, default=None,
                        help="time per measurement (default 5; quick 1)")
    parser.add_argument("--quick", action="store_true", help="tiny presets, small sizes")
    parser.add_argument("--out", default="throughput", help="writes OUT.json and OUT.md")
    args = parser.parse_args(argv)
    args.size = args.size or (64 if args.quick else 512)
    args.batches = args.batches or ([1, 4] if args.quick else [1, 32])
    args.iters = args.iters or (3 if args.quick else 10)
    args.max_seconds = args.max_seconds or (1.0 if args.quick else 5.0)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.classes > len(CLASSES):
        parser.error(f"--classes at most {len(CLASSES)}")
    return args


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn, device: torch.device, iters: int, max_seconds: float) -> float:
    """Median seconds per call after one warm-up call."""
    fn()
    _sync(device)
    times: list[float] = []
    budget_start = time.perf_counter()
    while len(times) < iters and (not times or time.perf_counter() - budget_start < max_seconds):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run(args: argparse.Namespace) -> dict:
    from onepass_ovs import Segmenter

    device = torch.device(args.device)
    presets = QUICK if args.quick else FULL
    vocabulary = CLASSES[: args.classes]
    rows = []
    env = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else
        (platform.processor() or platform.machine()),
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "threads": torch.get_num_threads(),
        "size": args.size,
        "classes": args.classes,
        "compile": args.compile,
        "quick": args.quick,
    }
    print(f"# {env}", flush=True)
    print(f"{'family':8} {'preset':16} {'mode':8} {'batch':>5} {'img/s':>9} {'ms/call':>9} {'peak GiB':>8}")
    for family in args.families:
        preset = presets[family]
        torch.manual_seed(0)
        seg = Segmenter.from_config(preset, device=device)
        text = seg.encode_text(vocabulary).to(device)
        for mode in args.modes:
            if mode == "fp32":
                seg.optimize(autocast=None, channels_last=False)
            else:
                seg.optimize(compile=args.compile)
            for batch in args.batches:
                row = {"family": family, "preset": preset, "mode": mode, "batch": batch}
                generator = torch.Generator().manual_seed(batch)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats(device)
                try:
                    if mode == "segment":
                        images = [
                            (torch.rand(args.size, args.size, 3, generator=generator) * 255)
                            .to(torch.uint8).numpy()
                            for _ in range(batch)
                        ]

                        def call(seg=seg, images=images, batch=batch):
                            seg.segment(images, vocabulary, size=args.size, batch_size=batch)
                    else:
                        canvas = torch.rand(batch, 3, args.size, args.size, generator=generator)
                        canvas = canvas.to(device)

                        def call(seg=seg, canvas=canvas, text=text):
                            seg.predict_labels(canvas, text)

                    seconds = measure(call, device, args.iters, args.max_seconds)
                    row.update(images_per_s=batch / seconds, ms_per_call=seconds * 1e3)
                except torch.cuda.OutOfMemoryError:
                    row.update(images_per_s=None, ms_per_call=None, error="out of memory")
                    torch.cuda.empty_cache()
                if device.type == "cuda":
                    row["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
                rows.append(row)
                ips = f"{row['images_per_s']:9.1f}" if row.get("images_per_s") else "      OOM"
                ms = f"{row['ms_per_call']:9.1f}" if row.get("ms_per_call") else "        -"
                peak = f"{row['peak_gib']:8.2f}" if "peak_gib" in row else "       -"
                print(f"{family:8} {preset:16} {mode:8} {batch:5d} {ips} {ms} {peak}", flush=True)
        del seg
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return {"environment": env, "rows": rows}


def markdown(report: dict) -> str:
    env = report["environment"]
    lines = [
        f"Throughput on {env['device']} (torch {env['torch']}), {env['size']} x {env['size']}, "
        f"{env['classes']} classes{', torch.compile' if env['compile'] else ''}"
        f"{' (quick: tiny presets)' if env['quick'] else ''}.",
        "",
        "| family | preset | mode | batch | images/s | ms / call | peak GiB |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for row in report["rows"]:
        ips = f"{row['images_per_s']:.1f}" if row.get("images_per_s") else row.get("error", "-")
        ms = f"{row['ms_per_call']:.1f}" if row.get("ms_per_call") else "-"
        peak = f"{row['peak_gib']:.2f}" if "peak_gib" in row else "-"
        lines.append(
            f"| {row['family']} | {row['preset']} | {row['mode']} | {row['batch']} | {ips} | "
            f"{ms} | {peak} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    args = parse_args(argv)
    report = run(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(report))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")
    return report


if __name__ == "__main__":
    main()
