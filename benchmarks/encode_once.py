"""Encode once, classify any vocabulary: a second vocabulary on an encoded image vs a full
``segment()`` of the same image.

    python benchmarks/encode_once.py                          # deop-vit-b16, 512 px, 20 classes
    python benchmarks/encode_once.py --model deop-tiny --size 64 --repeat 3

Random weights (speed does not depend on what the weights learned). Each timed call gets a
vocabulary never seen before (fresh class names), so both sides pay for their text
embeddings as an interactive user typing new names would; the encoded side pays only that
and the decoding (class scores, label map). Prints median wall times and their ratio.
"""

from __future__ import annotations

import argparse
import itertools
import platform
import statistics
import time

import numpy as np
import torch


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="deop-vit-b16", help="an architecture preset")
    parser.add_argument("--size", type=int, default=512, help="square image side (working size)")
    parser.add_argument("--classes", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from onepass_ovs import Segmenter

    seg = Segmenter.from_config(args.model, device=args.device, seed=0)
    image = (np.random.default_rng(0).random((args.size, args.size, 3)) * 255).astype(np.uint8)
    counter = itertools.count()

    def vocabulary() -> list[str]:
        run = next(counter)  # fresh names: no cached text embeddings
        return [f"object {i} of kind {run}" for i in range(args.classes)]

    def sync():
        if seg.device.type == "cuda":
            torch.cuda.synchronize()

    def timed(fn) -> float:
        fn()  # warm-up
        times = []
        for _ in range(args.repeat):
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    full = timed(lambda: seg.segment(image, vocabulary(), size=args.size))
    start = time.perf_counter()
    emb = seg.encode(image, size=args.size)
    sync()
    encode_time = time.perf_counter() - start
    second = timed(lambda: seg.segment(emb, vocabulary()))
    same = np.array_equal(
        seg.segment(emb, ["red", "blue"]).label_map,
        seg.segment(image, ["red", "blue"], size=args.size).label_map,
    )

    print(f"model {args.model}, {args.size} x {args.size}, {args.classes} classes, "
          f"device {args.device}, torch {torch.__version__}, {platform.processor() or '?'}, "
          f"{torch.get_num_threads()} threads")
    print(f"encoding held: {emb.nbytes / 2**20:.1f} MiB (encode once: {encode_time * 1e3:.1f} ms)")
    print(f"full segment():             {full * 1e3:9.1f} ms (median of {args.repeat})")
    print(f"segment(encoding, new vocab): {second * 1e3:7.1f} ms")
    print(f"ratio full / second vocabulary: {full / second:.1f}x  (label maps equal: {same})")


if __name__ == "__main__":
    main()
