"""One-pass DeOP vs a two-stream baseline vs one bare CLIP pass, side by side in one run.

    python benchmarks/speed.py                 # deop-vit-b16, 512 x 512, 20 classes
    python benchmarks/speed.py --size 256 --repeat 2

All models use the same random weights (``deop-vit-b16``); speed does not depend on what
the weights learned. Prints median wall times and the ratios the targets are stated in:
two-stream / one-pass (target >= 8x) and one-pass / (bare CLIP + proposal pass)
(target <= 1.3x).
"""

from __future__ import annotations

import platform

import numpy as np
import torch
from _common import add_speed_arguments, normalised_pass, parser_from_doc, timed


def main() -> None:
    parser = parser_from_doc(__doc__)
    parser.add_argument("--model", default="deop-vit-b16")
    add_speed_arguments(parser)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from onepass_ovs import Segmenter
    from onepass_ovs.models.preprocessing import normalise
    from onepass_ovs.models.two_stream import TwoStreamBaseline

    seg = Segmenter.from_config(args.model, device=args.device, seed=0)
    model = seg.model
    two_stream = Segmenter(TwoStreamBaseline(model), device=args.device)
    vocab = [f"class {i}" for i in range(args.classes)]
    image = (np.random.default_rng(0).random((args.size, args.size, 3)) * 255).astype(np.uint8)
    seg.encode_text(vocab)  # text is encoded once per vocabulary; both paths share the cache

    pre = seg.config.preprocess
    work = (args.size, args.size)  # working resolution = benchmark size for every path
    batch = torch.rand(1, 3, args.size, args.size, device=seg.device)

    bare_clip = normalised_pass(model.clip_visual, batch, pre.clip_mean, pre.clip_std)
    proposal_pass = normalised_pass(model.proposals, batch, pre.mean, pre.std)

    @torch.inference_mode()
    def proposal_backbone():
        x = normalise(batch, pre.mean, pre.std, None)
        model.proposals.backbone(x.contiguous(memory_format=torch.channels_last))

    rows = {
        "one-pass segment()": timed(lambda: seg.segment(image, vocab, size=work), args.repeat),
        "two-stream segment() (100 crops)": timed(
            lambda: two_stream.segment(image, vocab, size=work), args.repeat
        ),
        "bare CLIP ViT pass": timed(bare_clip, args.repeat),
        "proposal generator pass": timed(proposal_pass, args.repeat),
        "proposal backbone pass": timed(proposal_backbone, args.repeat),
    }
    one = rows["one-pass segment()"]
    print(f"# {args.model}, {args.size}x{args.size}, {args.classes} classes, "
          f"{model.config.family_config.proposals.num_queries} proposals, device={args.device}, "
          f"threads={torch.get_num_threads()}, {platform.processor() or platform.machine()}")
    print(f"| {'what':36} | {'median s':>9} |")
    print(f"|{'-' * 38}|{'-' * 11}|")
    for name, seconds in rows.items():
        print(f"| {name:36} | {seconds:9.3f} |")
    print()
    print(f"two-stream / one-pass                        = {rows['two-stream segment() (100 crops)'] / one:6.2f}x  (target >= 8)")
    base = rows["bare CLIP ViT pass"] + rows["proposal generator pass"]
    print(f"one-pass / (bare CLIP + proposal generator)  = {one / base:6.2f}x  (target <= 1.3)")
    base_bb = rows["bare CLIP ViT pass"] + rows["proposal backbone pass"]
    print(f"one-pass / (bare CLIP + proposal backbone)   = {one / base_bb:6.2f}x")


if __name__ == "__main__":
    main()
