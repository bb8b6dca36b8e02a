"""The shapes-world recipe that builds the offline ``demo-sed`` model, end to end.

    python -m onepass_ovs.toy.clip --tower convnext --output runs/convnext-clip   # the CLIP
    python -m onepass_ovs.toy.build_sed --output runs/demo-sed --clip runs/convnext-clip
    python -m onepass_ovs.toy.build_sed --output /tmp/q --clip DIR --quick       # smoke run

Steps (docs/sed.md, "The shapes world"):

1. the tiny ConvNeXt CLIP (a timm ConvNeXt through open_clip), pretrained on the scenes'
   captions by ``toy.clip``: SED's cost map is its dense per-pixel embedding against the
   class names in the caption templates;
2. the segmentation training scenes (the same stream as ``toy.build``; unseen classes
   ignore);
3. SED at shapes-world sizes around that CLIP, trained on the seen classes (the CLIP's
   image tower at ``--clip-lr-mult`` x the lr, its text tower frozen), on square 128 px
   crops with flips only (colour is what names a class here, so no colour jitter);
4. evaluation on fresh scenes with all 31 names, with category early rejection (the
   model's ``rejection_top_k``) and without it (``rejection_top_k = 0``), then the fp16
   pretrained folder (``--install`` copies it into the package as ``demo-sed``).

Seeds: training scenes ``TRAIN_SEED + seed``, evaluation ``EVAL_SEED`` (as ``toy.build``).
Every step's wall time and metrics go to ``summary.json`` (rewritten after each step).
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from ..config import ModelConfig, PreprocessConfig
from ..models.sed import SEDConfig, _sed_config
from .build import (
    EVAL_SEED,
    TRAIN_SEED,
    _last_logged,
    _Summary,
    evaluate_on_fresh_scenes,
    save_fp16,
    training_dataset,
)

#: ``--quick``: tiny step and scene counts, end to end in a minute or two on a CPU.
QUICK = {"steps": 3, "num_train": 8, "batch_size": 2, "num_eval": 4}

#: the cost map's P templates, in a fixed order: the phrasings of the tiny CLIP's captions
#: (``toy.scenes.make_caption``) with one object
TEMPLATES = [
    "{}.", "a photo of a {}.", "a picture of a {}.", "an image of a {}.", "there is a {}.",
    "a rendering of a {}.", "a scene with a {}.",
]  # fmt: skip


def demo_sed_config(clip_cfg: dict, rejection_top_k: int = 8) -> ModelConfig:
    """SED at shapes-world sizes around the tiny ConvNeXt CLIP (``clip_cfg``: its open_clip
    model config): decoder widths 64 -> 32 -> 16 -> 16, 7 templates, 128 px scenes."""
    preprocess = PreprocessConfig(
        short_side=128, max_long_side=512, pad_multiple=32, interpolation="bilinear", window=256
    )
    section = SEDConfig(
        hidden_dim=64,
        decoder_dims=(32, 16, 16),
        guidance_dims=(16, 8, 4),
        num_heads=4,
        cost_kernel=3,
        convnext_kernel=5,
        rejection_top_k=rejection_top_k,
        class_chunk=32,
    )
    return _sed_config(
        "demo-sed", "ovs-shapes-convnext-clip", copy.deepcopy(clip_cfg), preprocess,
        list(TEMPLATES), section,
    )  # fmt: skip


def build(
    output: Path,
    *,
    clip_dir: Path,
    steps: int = 1500,
    num_train: int = 2000,
    batch_size: int = 8,
    lr: float = 5e-4,
    clip_lr_mult: float = 0.01,
    num_eval: int = 200,
    seed: int = 0,
    device: str = "cpu",
    progress: bool = True,
) -> dict:
    """Run the recipe; returns the summary (also written as ``summary.json``)."""
    from .. import Segmenter
    from ..training.augment import SegmentationAugment
    from ..training.stages import train_sed
    from ..training.stages.sed import sed_default_config
    from .clip import load_tiny_clip

    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    work = output / "work"
    clip_dir = Path(clip_dir).resolve()
    settings = {
        "clip_dir": str(clip_dir), "steps": steps, "num_train": num_train,
        "batch_size": batch_size, "lr": lr, "clip_lr_mult": clip_lr_mult, "num_eval": num_eval,
        "seed": seed, "device": device, "torch_threads": torch.get_num_threads(),
        "train_seed": TRAIN_SEED + seed, "eval_seed": EVAL_SEED,
    }  # fmt: skip
    summary = _Summary(output / "summary.json", settings)
    start = time.perf_counter()

    dataset = training_dataset(work, num_train, seed, summary)

    clip_cfg = json.loads((clip_dir / "open_clip_config.json").read_text())["model_cfg"]
    torch.manual_seed(seed)
    segmenter = Segmenter.from_config(demo_sed_config(clip_cfg), device=device, seed=seed)
    segmenter.model.load_clip_weights(load_tiny_clip(clip_dir))

    print(f"[2/4] training SED ({steps} steps, CLIP image tower lr x{clip_lr_mult})", flush=True)
    t = time.perf_counter()
    run_dir = work / "sed"
    cfg = sed_default_config(
        steps=steps, batch_size=batch_size, lr=lr, seed=seed, output_dir=str(run_dir),
        checkpoint_every=500, log_every=min(50, steps), device=device, progress_bar=progress,
        lr_multipliers={"clip_visual": clip_lr_mult},
    )  # fmt: skip
    augment = SegmentationAugment(128, short_side=(128, 128))  # flips, no colour jitter
    trained = train_sed(segmenter, dataset, cfg, crop_size=128, augment=augment, resume="auto")
    summary.step("sed", time.perf_counter() - t, train=_last_logged(run_dir))

    print(f"[3/4] evaluating on {num_eval} fresh scenes (all 31 names), CER on and off", flush=True)
    top_k = trained.config.family_config.rejection_top_k
    no_rejection = Segmenter.from_config(
        trained.config.replace(**{"sed.rejection_top_k": 0}), device=device, seed=seed
    )
    no_rejection.model.load_state_dict(trained.model.state_dict())
    rows = {"sed": trained, "sed_no_rejection": no_rejection}
    for name, seg in rows.items():
        t = time.perf_counter()
        metrics = evaluate_on_fresh_scenes(seg, work / "eval_scenes", num_eval)
        summary.model(name, metrics, time.perf_counter() - t)
        print(f"      {name}: {json.dumps(summary.data['models'][name])}", flush=True)
    summary.data["rejection_top_k"] = top_k

    print(f"[4/4] writing {output / 'model'}", flush=True)
    save_fp16(trained, output / "model")
    return summary.finish(start)


def main(argv: list[str] | None = None) -> None:
    from .build import install

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True, type=Path)
    parser.add_argument("--clip", required=True, type=Path, help="the pretrained tiny ConvNeXt CLIP folder")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--num-train", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--clip-lr-mult", type=float, default=0.01)
    parser.add_argument("--num-eval", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="a tiny end-to-end smoke run")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--install", action="store_true", help="ship the result as `demo-sed`")
    args = parser.parse_args(argv)
    sizes = dict(steps=args.steps, num_train=args.num_train, batch_size=args.batch_size,
                 num_eval=args.num_eval)  # fmt: skip
    if args.quick:
        sizes = dict(QUICK)
    summary = build(
        args.output, clip_dir=args.clip, lr=args.lr, clip_lr_mult=args.clip_lr_mult,
        seed=args.seed, device=args.device, progress=not args.no_progress, **sizes,
    )
    if args.install:
        print(f"installed as demo-sed: {install(args.output / 'model', 'demo-sed')}")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
