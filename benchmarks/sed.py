"""SED's cost: the image pass, the decoder at several vocabulary sizes, and the decoder's
cost per (kept) class, so a reader can extrapolate to any number of surviving classes.

    python benchmarks/sed.py                                   # sed-convnext-b, 640 x 640, CPU
    python benchmarks/sed.py --classes 20,150,847 --device cuda
    python benchmarks/sed.py --model sed-tiny --size 64 --classes 5,10 --repeat 1   # smoke

Random weights (speed does not depend on what the weights learned) and random normalised
per-template text embeddings (K, P, E) (encoding 847 x 80 prompts would dominate a CPU run
and is cached per vocabulary in real use). Category early rejection is off for the table:
how many classes it keeps depends on trained weights, and the decoder's time is linear in
the kept classes, so ``per-class`` below times that count gives the decoder time with CER
(plus the cheap first stage, which always sees all K). ``--top-k`` additionally times CER on
these random weights, printing how many classes survived (not representative of real
images).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
import torch.nn.functional as F


def timed(fn, repeat: int, device: torch.device) -> float:
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    fn()  # warm-up (allocations, caches)
    sync()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_memory(fn, device: torch.device) -> str:
    if device.type != "cuda":
        return "n/a"
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="sed-convnext-b")
    parser.add_argument("--size", type=int, default=640)
    parser.add_argument("--classes", default="20,150,847")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--top-k", type=int, default=0, help="also time CER with this k")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.size % 32:
        parser.error(f"--size must be a multiple of 32, got {args.size}")
    counts = [int(c) for c in args.classes.split(",")]

    from onepass_ovs.models.registry import build_model, preset_config

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    model = build_model(preset_config(args.model)).to(device=device, dtype=dtype).eval()
    section = model.config.family_config
    section.rejection_top_k = 0
    images = torch.rand(1, 3, args.size, args.size, device=device, dtype=dtype)
    generator = torch.Generator().manual_seed(0)

    def text_for(k: int) -> torch.Tensor:
        t = torch.randn(k, model.num_templates, model.embed_dim, generator=generator)
        return F.normalize(t, dim=-1).to(device)

    print(
        f"{args.model}, {args.size} x {args.size}, batch 1, {args.dtype}, device {device} "
        f"({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads), "
        f"P = {model.num_templates}, decoder {sum(p.numel() for p in model.decoder.parameters()) / 1e6:.2f}M params"
    )
    with torch.inference_mode():
        encode = timed(lambda: model.encode_image(images), args.repeat, device)
        encoding = model.encode_image(images)
        print(f"image pass (CLIP ConvNeXt + guidance): {encode * 1e3:.1f} ms")
        print(f"{'K':>6} {'decoder ms':>11} {'total ms':>9} {'ms/class':>9} {'peak mem':>9}")
        rows = []
        for k in counts:
            text = text_for(k)
            decode = timed(lambda t=text: model.decode_scores(encoding, t), args.repeat, device)
            memory = peak_memory(lambda t=text: model.predict_scores(images, t), device)
            rows.append((k, decode))
            print(
                f"{k:>6} {decode * 1e3:>11.1f} {(encode + decode) * 1e3:>9.1f} "
                f"{decode / k * 1e3:>9.2f} {memory:>9}"
            )
        if len(rows) >= 2:
            ks = torch.tensor([r[0] for r in rows], dtype=torch.float64)
            ts = torch.tensor([r[1] for r in rows], dtype=torch.float64)
            slope = float(((ks - ks.mean()) * (ts - ts.mean())).sum() / ((ks - ks.mean()) ** 2).sum())
            print(f"decoder cost per class (least-squares slope over K): {slope * 1e3:.2f} ms")
        if args.top_k > 0:
            section.rejection_top_k = args.top_k
            k = counts[-1]
            text = text_for(k)
            decode = timed(lambda: model.decode_scores(encoding, text), args.repeat, device)
            kept = int((model.decode_scores(encoding, text)[0] > 0).flatten(1).any(1).sum())
            print(
                f"CER k = {args.top_k} at K = {k}: decoder {decode * 1e3:.1f} ms, {kept} classes "
                "kept to the end (random weights: not representative)"
            )


if __name__ == "__main__":
    main()
