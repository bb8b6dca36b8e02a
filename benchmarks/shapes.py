"""The shapes-world table: seen / unseen mIoU, hIoU and images/s, all on the same fresh scenes.

    python benchmarks/shapes.py                                  # the shipped demo
    python benchmarks/shapes.py --ablations runs/demo/ablations  # after toy.build --ablations

Rows (every one evaluated on the same freshly rendered scenes with all 31 names as the
vocabulary; scenes come from a seed never used for training):

- DeOP: the demo model (``--model``, default the shipped ``demo``)
- DeOP trained without patch severance (``<ablations>/no_severance``, if given)
- DeOP with mask-average pooling instead of CAL (``<ablations>/mask_average``, if given)
- two-stream baseline: the demo's proposals, each cropped and classified by the tiny CLIP
  (one CLIP pass per proposal), assembled like DeOP
- training-free: one pass of the tiny CLIP with last-block severance, dense per-patch
  classification (``clip:<model>``)
- SED: the shipped ``demo-sed`` (its own tiny ConvNeXt CLIP), with category early
  rejection (its ``rejection_top_k``) and without it
- GKC: the shipped ``demo-gkc`` (no CLIP image pass), and the rows trained without text
  diversification and / or distillation (``--gkc-ablations <build_gkc output>/ablations``)

Families whose preset is not installed are skipped.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo", help="the DeOP model to evaluate")
    parser.add_argument("--ablations", type=Path, default=None,
                        help="folder with no_severance/ and mask_average/ models (toy.build)")
    parser.add_argument("--gkc-ablations", type=Path, default=None,
                        help="folder with no_synonyms/, no_distillation/, plain/ (toy.build_gkc)")
    parser.add_argument("--num", type=int, default=300, help="fresh evaluation scenes")
    parser.add_argument("--seed", type=int, default=None, help="scene stream (default: the eval seed)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from onepass_ovs import Segmenter, list_models
    from onepass_ovs.data import FolderDataset
    from onepass_ovs.evaluation.evaluate import evaluate
    from onepass_ovs.models.two_stream import TwoStreamBaseline
    from onepass_ovs.toy import scenes
    from onepass_ovs.toy.build import EVAL_SEED
    from onepass_ovs.toy.export import export_folder

    seed = EVAL_SEED + 1 if args.seed is None else args.seed  # fresh: not the build's eval set
    with tempfile.TemporaryDirectory() as tmp:
        dataset = FolderDataset(export_folder(Path(tmp) / "scenes", args.num, seed))
        demo = Segmenter.from_pretrained(args.model, device="cpu")
        rows: dict[str, Segmenter] = {"DeOP (demo)": demo}
        for name, label in (("no_severance", "DeOP without patch severance"),
                            ("mask_average", "DeOP, mask-average pooling (no CAL)")):
            folder = args.ablations / name if args.ablations else None
            if folder is not None and folder.exists():
                rows[label] = Segmenter.from_pretrained(folder, device="cpu")
        rows["two-stream (crop + CLIP per proposal)"] = Segmenter(TwoStreamBaseline(demo.model), device="cpu")
        if hasattr(Segmenter, "from_clip"):
            rows["training-free (tiny CLIP, dense)"] = Segmenter.from_pretrained(
                f"clip:{args.model}", device="cpu")
        installed = set(list_models(pretrained_only=True))
        if "demo-sed" in installed:
            sed = Segmenter.from_pretrained("demo-sed", device="cpu")
            top_k = sed.config.family_config.rejection_top_k
            rows[f"SED (demo-sed), early rejection top-{top_k}"] = sed
            off = Segmenter.from_config(sed.config.replace(**{"sed.rejection_top_k": 0}), device="cpu")
            off.model.load_state_dict(sed.model.state_dict())
            rows["SED (demo-sed), no early rejection"] = off
        if "demo-gkc" in installed:
            rows["GKC (demo-gkc): synonyms + distillation"] = Segmenter.from_pretrained("demo-gkc", device="cpu")
            for name, label in (("no_synonyms", "GKC without text diversification"),
                                ("no_distillation", "GKC without distillation"),
                                ("plain", "GKC without both")):
                folder = args.gkc_ablations / name if args.gkc_ablations else None
                if folder is not None and folder.exists():
                    rows[label] = Segmenter.from_pretrained(folder, device="cpu")

        results = {}
        for label, seg in rows.items():
            metrics = evaluate(seg, dataset, unseen=list(scenes.UNSEEN_CLASSES),
                               batch_size=args.batch_size, progress=False)
            results[label] = metrics
            print(f"{label}: seen {metrics['miou_seen']:.1f} unseen {metrics['miou_unseen']:.1f} "
                  f"hIoU {metrics['hiou']:.1f} ({metrics['images_per_second']:.1f} img/s)", flush=True)

    print()
    print(f"# {args.num} fresh 128x128 scenes (seed {seed}), vocabulary = all 31 names, "
          f"CPU threads={torch.get_num_threads()}")
    print("| model | seen mIoU | unseen mIoU | hIoU | images/s |")
    print("|---|---:|---:|---:|---:|")
    for label, m in results.items():
        print(f"| {label} | {m['miou_seen']:.1f} | {m['miou_unseen']:.1f} | {m['hiou']:.1f} | "
              f"{m['images_per_second']:.1f} |")
    deop = results["DeOP (demo)"]
    two = results["two-stream (crop + CLIP per proposal)"]
    print(f"\nDeOP vs two-stream: {deop['images_per_second'] / two['images_per_second']:.1f}x faster, "
          f"hIoU {deop['hiou']:.1f} vs {two['hiou']:.1f}")
    if not args.markdown:
        print(json.dumps({k: {m: v[m] for m in ("miou_seen", "miou_unseen", "hiou", "images_per_second")}
                          for k, v in results.items()}, indent=2))


if __name__ == "__main__":
    main()
