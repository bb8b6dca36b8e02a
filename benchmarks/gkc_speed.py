"""GKC vs DeOP on CPU, side by side in one run: ``segment()`` wall time per image.

    python benchmarks/gkc_speed.py                        # 512 x 512, 20 classes
    python benchmarks/gkc_speed.py --size 128 --repeat 1  # a quick smoke run

Both models are random (``gkc-clip-rn50`` and ``deop-vit-b16``, seeded); speed does not
depend on what the weights learned. GKC runs no CLIP image pass at inference (its
backbone is the CLIP RN50 trunk, fine-tuned; the classifier is CLIP's text side), while
DeOP runs a proposal generator and a CLIP ViT-B/16. Text is encoded once per vocabulary
before timing (both models cache it). Prints the median times, the passes each model's
time is made of, and the ratio DeOP / GKC.
"""

from __future__ import annotations

import platform

import numpy as np
import torch
from _common import add_speed_arguments, normalised_pass, parser_from_doc, timed


def main() -> None:
    parser = parser_from_doc(__doc__)
    parser.add_argument("--gkc", default="gkc-clip-rn50")
    parser.add_argument("--deop", default="deop-vit-b16")
    add_speed_arguments(parser)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.size % 32:
        parser.error("--size must be a multiple of 32")

    from onepass_ovs import Segmenter

    gkc = Segmenter.from_config(args.gkc, device=args.device, seed=0)
    deop = Segmenter.from_config(args.deop, device=args.device, seed=0)
    vocab = [f"class {i}" for i in range(args.classes)]
    image = (np.random.default_rng(0).random((args.size, args.size, 3)) * 255).astype(np.uint8)
    work = (args.size, args.size)
    for seg in (gkc, deop):
        seg.encode_text(vocab)  # once per vocabulary, outside the timings
    batch = torch.rand(1, 3, args.size, args.size, device=gkc.device)
    g, d = gkc.model, deop.model
    gpre, dpre = gkc.config.preprocess, deop.config.preprocess

    gkc_backbone = normalised_pass(g.backbone, batch, gpre.mean, gpre.std)
    deop_clip = normalised_pass(d.clip_visual, batch, dpre.clip_mean, dpre.clip_std)
    deop_proposals = normalised_pass(d.proposals, batch, dpre.mean, dpre.std)

    @torch.inference_mode()
    def gkc_decoders():
        g.run_decoders(batch)

    rows = {
        f"{args.gkc} segment()": timed(lambda: gkc.segment(image, vocab, size=work), args.repeat),
        "  GKC: RN50 trunk": timed(gkc_backbone, args.repeat),
        "  GKC: trunk + pixel decoder + decoder": timed(gkc_decoders, args.repeat),
        f"{args.deop} segment()": timed(lambda: deop.segment(image, vocab, size=work), args.repeat),
        "  DeOP: CLIP ViT pass": timed(deop_clip, args.repeat),
        "  DeOP: proposal generator pass": timed(deop_proposals, args.repeat),
    }
    print(
        f"# {args.size}x{args.size}, {args.classes} classes, random weights, "
        f"device={args.device}, threads={torch.get_num_threads()}, "
        f"{platform.processor() or platform.machine()}"
    )
    print(f"| {'what':40} | {'median s':>9} |")
    print(f"|{'-' * 42}|{'-' * 11}|")
    for name, seconds in rows.items():
        print(f"| {name:40} | {seconds:9.3f} |")
    ratio = rows[f"{args.deop} segment()"] / rows[f"{args.gkc} segment()"]
    print()
    print(f"{args.deop} / {args.gkc} = {ratio:.2f}x  (GKC has no CLIP image pass)")


if __name__ == "__main__":
    main()
