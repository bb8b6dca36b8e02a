"""The shapes-world recipe that builds the offline ``demo-gkc`` model, end to end.

    python -m onepass_ovs.toy.build_gkc --output runs/demo-gkc --clip runs/clip \
        --trunk-clip runs/convnext-clip --steps 1500             # the shipped demo-gkc
    python -m onepass_ovs.toy.build_gkc --output runs/demo-gkc --clip DIR --ablations
    python -m onepass_ovs.toy.build_gkc --output /tmp/q --clip DIR --quick   # smoke run

Steps (docs/gkc.md, "The shapes world"):

1. the tiny CLIP (``python -m onepass_ovs.toy.clip``, or the one ``toy.build`` trained):
   its text tower names the classes, and the same CLIP, frozen, scores the synonyms and
   embeds each training region for distillation. It saw objects only at their natural
   scale, so it views a region *in place* (the whole scene, pixels outside the region
   grey), not as the authors' magnified box crop (``FrozenClip(region_view="in_place")``);
2. the segmentation training scenes (the same stream as ``toy.build``; unseen classes
   ignore);
3. GKC at shapes-world sizes: the tiny CLIP's text tower, frozen, and as backbone the
   trunk of a tiny ConvNeXt CLIP (``--trunk-clip``, or ``--clip`` itself when it is one;
   fine-tuned at 0.1x the lr, as the paper's CLIP RN50 trunk), or without one a
   CLIP-ResNet-shaped trunk trained from scratch (lr multiplier 1);
4. training with text diversification (the built-in shapes-world synonyms: colour and
   shape synonyms crossed) and text-guided distillation, the plain class-name loss kept;
   ``--ablations`` also trains without diversification, without distillation, and
   without both, from the same initialisation and data;
5. evaluation on fresh scenes with all 31 names (seen / unseen / hIoU, images/s), then the
   fp16 pretrained folder (``--install`` copies it into the package as ``demo-gkc``).

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

from ..config import (
    CLIP_MEAN,
    CLIP_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    ClipConfig,
    ModelConfig,
    PreprocessConfig,
    TextConfig,
)
from ..models.gkc import CLIP_CONVNEXT, CLIP_RESNET, GKCConfig
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

#: training variants: name -> (use_synonyms, distill)
VARIANTS = {
    "gkc": (True, True),
    "no_synonyms": (False, True),
    "no_distillation": (True, False),
    "plain": (False, False),
}


def demo_gkc_config(clip_cfg: dict, trunk_cfg: dict | None = None) -> ModelConfig:
    """GKC at shapes-world sizes around the tiny CLIP ``clip_cfg`` (its open_clip model
    config), whose text tower names the classes. The backbone is the trunk of the ConvNeXt
    CLIP ``trunk_cfg`` (default ``clip_cfg`` itself when it is a ConvNeXt CLIP:
    ``vision_cfg.timm_model_name``): ``"clip-convnext"``, fine-tuned as the paper fine-tunes
    its CLIP RN50 trunk, images in CLIP's normalisation. Without a ConvNeXt CLIP it is a
    CLIP-ResNet-shaped trunk at width 16 (channels 64 / 128 / 256 / 512 at strides 4-32)
    trained from scratch on ImageNet-normalised images."""
    if trunk_cfg is None and "timm_model_name" in clip_cfg.get("vision_cfg", {}):
        trunk_cfg = clip_cfg
    if trunk_cfg is not None:
        if "timm_model_name" not in trunk_cfg.get("vision_cfg", {}):
            raise ValueError("the trunk CLIP must be a timm ConvNeXt CLIP (vision_cfg.timm_model_name)")
        model_cfg = {
            "embed_dim": clip_cfg["embed_dim"],
            "quick_gelu": bool(clip_cfg.get("quick_gelu", False)),
            "vision_cfg": copy.deepcopy(trunk_cfg["vision_cfg"]),
            "text_cfg": copy.deepcopy(clip_cfg["text_cfg"]),
        }
        backbone, mean, std = CLIP_CONVNEXT, CLIP_MEAN, CLIP_STD
    else:
        model_cfg = {
            "embed_dim": clip_cfg["embed_dim"],
            "quick_gelu": bool(clip_cfg.get("quick_gelu", False)),
            "vision_cfg": {"image_size": 128, "layers": [1, 1, 1, 1], "width": 16, "patch_size": None},
            "text_cfg": copy.deepcopy(clip_cfg["text_cfg"]),
        }
        backbone, mean, std = CLIP_RESNET, IMAGENET_MEAN, IMAGENET_STD
    return ModelConfig(
        family="gkc",
        name="demo-gkc",
        preprocess=PreprocessConfig(
            short_side=128, max_long_side=512, pad_multiple=32, window=256, mean=mean, std=std
        ),
        clip=ClipConfig(model_name="ovs-shapes-clip", model_cfg=model_cfg),
        text=TextConfig(templates="single", prompt_length=0),
        family_config=GKCConfig(
            backbone=backbone,
            hidden_dim=64,
            mask_dim=64,
            norm_groups=8,
            encoder_layers=2,
            encoder_heads=4,
            encoder_points=4,
            encoder_ffn_dim=128,
            num_queries=16,
            num_heads=4,
            dim_feedforward=256,
            dec_layers=3,
            class_hidden=128,
        ),
    )


def build(
    output: Path,
    *,
    clip_dir: Path,
    trunk_clip_dir: Path | None = None,
    steps: int = 2000,
    num_train: int = 2000,
    batch_size: int = 8,
    lr: float = 5e-4,
    num_points: int = 128 * 128,
    num_eval: int = 200,
    seed: int = 0,
    ablations: bool = False,
    device: str = "cpu",
    progress: bool = True,
) -> dict:
    """Run the recipe; returns the summary (also written as ``summary.json``).

    ``clip_dir``: the tiny CLIP naming the classes (text tower), scoring synonyms and
    teaching; ``trunk_clip_dir``: a tiny ConvNeXt CLIP whose trunk is the backbone
    (default: ``clip_dir``'s if it is one, else a trunk trained from scratch).

    ``num_points``: mask-loss points per region; the default covers a whole 128 px crop,
    so the losses use every pixel (cheaper on a CPU than choosing uncertain points).
    """
    from .. import Segmenter
    from ..data.synonyms import shapes_world_synonyms
    from ..training.gkc_offline import load_frozen_clip
    from ..training.stages import default_config, train_gkc
    from .clip import load_tiny_clip

    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    work = output / "work"
    clip_dir = Path(clip_dir).resolve()
    settings = {
        "clip_dir": str(clip_dir),
        "trunk_clip_dir": str(trunk_clip_dir) if trunk_clip_dir else None, "steps": steps, "num_train": num_train,
        "batch_size": batch_size, "lr": lr, "num_points": num_points, "num_eval": num_eval, "seed": seed,
        "ablations": ablations, "device": device, "torch_threads": torch.get_num_threads(),
        "train_seed": TRAIN_SEED + seed, "eval_seed": EVAL_SEED, "region_view": "in_place",
    }  # fmt: skip
    summary = _Summary(output / "summary.json", settings)
    start = time.perf_counter()

    dataset = training_dataset(work, num_train, seed, summary)

    clip_model = load_tiny_clip(clip_dir)
    clip_cfg = json.loads((clip_dir / "open_clip_config.json").read_text())["model_cfg"]
    teacher = load_frozen_clip(f"local-dir:{clip_dir}", device=device, region_view="in_place")
    synonyms = [shapes_world_synonyms(dataset.classes)]
    cache_dir = work / "offline"  # synonym scores and teacher embeddings, shared by the rows

    trunk_clip, trunk_cfg = None, None
    if trunk_clip_dir is not None:
        trunk_clip_dir = Path(trunk_clip_dir).resolve()
        trunk_clip = load_tiny_clip(trunk_clip_dir)
        trunk_cfg = json.loads((trunk_clip_dir / "open_clip_config.json").read_text())["model_cfg"]
    torch.manual_seed(seed)
    base = Segmenter.from_config(demo_gkc_config(clip_cfg, trunk_cfg), device=device, seed=seed)
    pretrained_trunk = base.config.family_config.backbone == CLIP_CONVNEXT
    base.model.load_text_weights(clip_model)
    if pretrained_trunk:
        base.model.load_trunk_weights(trunk_clip if trunk_clip is not None else clip_model)
    backbone_lr_mult = 0.1 if pretrained_trunk else 1.0
    initial = copy.deepcopy(base.model.state_dict())

    names = list(VARIANTS) if ablations else ["gkc"]
    trained = {}
    for name in names:
        use_synonyms, distill = VARIANTS[name]
        print(f"[2/4] training GKC: {name} (synonyms {use_synonyms}, distillation {distill}, "
              f"{steps} steps)", flush=True)  # fmt: skip
        t = time.perf_counter()
        segmenter = Segmenter.from_config(base.config, device=device, seed=seed)
        segmenter.model.load_state_dict(initial)
        run_dir = work / f"gkc_{name}"
        cfg = default_config(
            "gkc", steps=steps, batch_size=batch_size, lr=lr, seed=seed, output_dir=str(run_dir),
            checkpoint_every=500, log_every=min(50, steps), device=device, progress_bar=progress,
            lr_multipliers={"backbone": backbone_lr_mult},
        )  # fmt: skip
        trained[name] = train_gkc(
            segmenter, dataset, cfg, synonym_sources=synonyms, teacher=teacher,
            use_synonyms=use_synonyms, distill=distill, crop_size=128, cache_dir=cache_dir,
            num_points=num_points, resume="auto",
        )  # fmt: skip
        summary.step(f"gkc_{name}", time.perf_counter() - t, use_synonyms=use_synonyms,
                     distill=distill, train=_last_logged(run_dir))  # fmt: skip

    print(f"[3/4] evaluating on {num_eval} fresh scenes (all 31 names)", flush=True)
    for name, seg in trained.items():
        t = time.perf_counter()
        metrics = evaluate_on_fresh_scenes(seg, work / "eval_scenes", num_eval)
        summary.model(name, metrics, time.perf_counter() - t)
        print(f"      {name}: {json.dumps(summary.data['models'][name])}", flush=True)

    print(f"[4/4] writing {output / 'model'}", flush=True)
    for name, seg in trained.items():
        save_fp16(seg, output / ("model" if name == "gkc" else f"ablations/{name}"))
    return summary.finish(start)


def main(argv: list[str] | None = None) -> None:
    from .build import install

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True, type=Path)
    parser.add_argument("--clip", required=True, type=Path, help="the pretrained tiny CLIP folder")
    parser.add_argument("--trunk-clip", type=Path, default=None,
                        help="a tiny ConvNeXt CLIP folder whose trunk is the backbone")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--num-train", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--num-eval", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--ablations", action="store_true")
    parser.add_argument("--quick", action="store_true", help="a tiny end-to-end smoke run")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--install", action="store_true", help="ship the result as `demo-gkc`")
    args = parser.parse_args(argv)
    sizes = dict(steps=args.steps, num_train=args.num_train, batch_size=args.batch_size,
                 num_eval=args.num_eval)  # fmt: skip
    if args.quick:
        sizes = dict(QUICK)
    summary = build(
        args.output, clip_dir=args.clip, trunk_clip_dir=args.trunk_clip, lr=args.lr, seed=args.seed, ablations=args.ablations,
        device=args.device, progress=not args.no_progress, **sizes,
    )
    if args.install:
        print(f"installed as demo-gkc: {install(args.output / 'model', 'demo-gkc')}")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
