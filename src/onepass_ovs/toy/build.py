"""The shapes-world recipe that builds the offline ``demo`` model, end to end.

    python -m onepass_ovs.toy.build --output runs/demo            # everything, fixed seeds
    python -m onepass_ovs.toy.build --output runs/demo --install  # ... and ship it as `demo`

Steps (SHAPES_WORLD.md "Protocol"):

1. pretrain the tiny CLIP contrastively on (scene, caption) pairs — image-level captions
   only, all 30 classes (``toy.clip.pretrain_tiny_clip``);
2. export segmentation training scenes (folder format); the 6 unseen classes become
   ignore through the dataset's ``unseen=`` (the open-vocabulary protocol);
3. build the demo DeOP architecture around the frozen tiny CLIP;
4. train the proposal generator (``ovs-train proposals``' function) on seen classes;
5. train DeOP's heads (``ovs-train deop``' function): CAL, learned positions, void, and
   (``--clip-lr-mult``, default 0.1) the CLIP image tower at a small learning rate: the
   tiny CLIP never saw the word "background" in a caption, so a frozen one cannot place it;
6. evaluate on freshly rendered scenes with all 31 names (seen / unseen / hIoU);
7. write a normal pretrained folder (fp16 weights), and with ``--install`` copy it into
   the package as the ``demo`` preset.

``--ablations`` also trains, from the same proposals, the two DeOP variants the shapes
benchmark compares (no patch severance; mask-average pooling instead of CAL).
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import time
from pathlib import Path

import torch

from ..config import ClipConfig, ModelConfig, PreprocessConfig, TextConfig
from ..models.anchors import AnchorConfig
from ..models.deop import DeOPConfig
from ..models.proposals import ProposalConfig
from . import scenes

EVAL_SEED = 20_261_121  # the evaluation stream; never used for training or tuning
TRAIN_SEED = 1


def demo_config(clip_cfg: dict) -> ModelConfig:
    """The demo architecture: DeOP's code path at shapes-world sizes."""
    vision = clip_cfg["vision_cfg"]
    grid = 128 // vision["patch_size"]
    layers = vision["layers"]
    return ModelConfig(
        family="deop",
        name="demo",
        preprocess=PreprocessConfig(short_side=128, max_long_side=512, pad_multiple=32),
        clip=ClipConfig(
            model_name="ovs-shapes-clip",
            model_cfg=copy.deepcopy(clip_cfg),
            learned_pos_grid=grid,
            learned_pos_blocks=tuple(range(1, min(3, layers))),
            severance="weighted",
            severance_blocks=(layers - 1,),
        ),
        family_config=DeOPConfig(
        proposals=ProposalConfig(
            backbone="resnet18",
            backbone_kwargs={"channels": [16, 32, 64, 128], "stem_width": 16},
            conv_dim=64,
            mask_dim=64,
            hidden_dim=64,
            num_queries=16,
            num_heads=4,
            dim_feedforward=256,
            dec_layers=3,
            dropout=0.0,
            norm_groups=8,
            class_hidden=128,
        ),
        anchors=AnchorConfig(num_heads=4, dim_feedforward=256, dropout=0.1),
        ),
        text=TextConfig(templates="single", prompt_length=0),
    )


def evaluate_on_fresh_scenes(segmenter, folder: Path, n: int, seed: int = EVAL_SEED) -> dict:
    """mIoU (seen / unseen / hIoU) on ``n`` fresh scenes with all 31 names as vocabulary."""
    from ..data import FolderDataset
    from ..evaluation.evaluate import evaluate
    from .export import export_folder

    if not (folder / "classes.txt").exists():
        export_folder(folder, n, seed)
    dataset = FolderDataset(folder)
    return evaluate(segmenter, dataset, unseen=list(scenes.UNSEEN_CLASSES), progress=False)


def build(
    output: Path,
    *,
    clip_dir: Path | None = None,
    clip_steps: int = 2000,
    num_train: int = 2000,
    proposal_steps: int = 1000,
    deop_steps: int = 800,
    clip_lr_mult: float | None = 0.1,
    batch_size: int = 8,
    num_eval: int = 200,
    seed: int = 0,
    ablations: bool = False,
) -> dict:
    """Run the recipe; returns the evaluation report (also written as ``report.json``)."""
    from .. import Segmenter
    from ..data import FolderDataset
    from ..training.stages import default_config, train_deop, train_proposals
    from .clip import load_tiny_clip, pretrain_tiny_clip
    from .export import export_folder

    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    work = output / "work"
    timings: dict[str, float] = {}
    start = time.perf_counter()

    # 1. tiny CLIP
    if clip_dir is None:
        clip_dir = work / "clip"
        print(f"[1/6] pretraining the tiny CLIP ({clip_steps} steps) -> {clip_dir}", flush=True)
        pretrain_tiny_clip(clip_dir, steps=clip_steps, seed=seed)
    else:
        print(f"[1/6] using the pretrained tiny CLIP in {clip_dir}", flush=True)
    clip = load_tiny_clip(clip_dir)
    clip_cfg = json.loads((Path(clip_dir) / "open_clip_config.json").read_text())["model_cfg"]
    timings["clip"] = time.perf_counter() - start

    # 2. segmentation training scenes
    train_dir = work / "train_scenes"
    if not (train_dir / "classes.txt").exists():
        print(f"[2/6] rendering {num_train} training scenes -> {train_dir}", flush=True)
        export_folder(train_dir, num_train, TRAIN_SEED + seed)
    dataset = FolderDataset(train_dir, unseen=list(scenes.UNSEEN_CLASSES))

    # 3. the demo architecture around the frozen tiny CLIP
    torch.manual_seed(seed)
    segmenter = Segmenter.from_config(demo_config(clip_cfg), device="cpu", seed=seed)
    segmenter.model.load_clip_weights(clip)

    # 4. proposals
    print(f"[3/6] training the proposal generator ({proposal_steps} steps)", flush=True)
    t = time.perf_counter()
    proposals_cfg = default_config(
        "proposals", steps=proposal_steps, batch_size=batch_size, lr=5e-4, seed=seed,
        output_dir=str(work / "proposals"), checkpoint_every=500, log_every=50,
    )
    segmenter = train_proposals(segmenter, dataset, proposals_cfg, crop_size=128)
    timings["proposals"] = time.perf_counter() - t

    # 5. DeOP heads (and the ablations, from the same proposals)
    variants = {"deop": {}}
    if ablations:
        variants["no_severance"] = {"clip.severance": "none"}
        variants["mask_average"] = {"anchors.pooling": "mask_average"}
    trained = {}
    for name, changes in variants.items():
        print(f"[4/6] training DeOP heads: {name} ({deop_steps} steps)", flush=True)
        t = time.perf_counter()
        base = segmenter
        if changes:
            cfg = segmenter.config.replace(**changes)
            base = Segmenter.from_config(cfg, device="cpu", seed=seed)
            base.model.load_state_dict(segmenter.model.state_dict(), strict=False)
        deop_cfg = default_config(
            "deop", steps=deop_steps, batch_size=batch_size, lr=1e-3, seed=seed,
            output_dir=str(work / f"deop_{name}"), checkpoint_every=500, log_every=50,
        )
        trained[name] = train_deop(base, dataset, deop_cfg, crop_size=128, clip_lr_mult=clip_lr_mult)
        timings[f"deop_{name}"] = time.perf_counter() - t

    # 6. evaluation on fresh scenes
    print(f"[5/6] evaluating on {num_eval} fresh scenes (all 31 names)", flush=True)
    report = {"timings_s": timings, "models": {}}
    for name, seg in trained.items():
        metrics = evaluate_on_fresh_scenes(seg, work / "eval_scenes", num_eval)
        report["models"][name] = {k: metrics[k] for k in ("miou", "miou_seen", "miou_unseen", "hiou")}
        print(f"      {name}: {json.dumps(report['models'][name])}", flush=True)

    # 7. the pretrained folders (fp16 storage keeps the demo small)
    print(f"[6/6] writing {output / 'model'}", flush=True)
    for name, seg in trained.items():
        folder = output / ("model" if name == "deop" else f"ablations/{name}")
        seg.model.half()
        seg.save_pretrained(folder)
        seg.model.float()
    report["timings_s"]["total"] = time.perf_counter() - start
    (output / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def install(model_dir: Path) -> Path:
    """Copy a built model folder into the package as the ``demo`` preset."""
    from ..hub import package_weights_dir

    target = package_weights_dir("demo")
    target.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "model.safetensors"):
        shutil.copy(Path(model_dir) / name, target / name)
    return target


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True, type=Path)
    parser.add_argument("--clip", type=Path, default=None,
                        help="use this pretrained tiny CLIP folder instead of step 1")
    parser.add_argument("--clip-steps", type=int, default=2000)
    parser.add_argument("--num-train", type=int, default=2000)
    parser.add_argument("--proposal-steps", type=int, default=1000)
    parser.add_argument("--deop-steps", type=int, default=800)
    parser.add_argument("--clip-lr-mult", type=float, default=0.1,
                        help="fine-tune the CLIP image tower at this lr multiplier (0 = frozen)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--num-eval", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--ablations", action="store_true")
    parser.add_argument("--install", action="store_true", help="ship the result as `demo`")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    report = build(
        args.output, clip_dir=args.clip, clip_steps=args.clip_steps, num_train=args.num_train,
        proposal_steps=args.proposal_steps, deop_steps=args.deop_steps,
        batch_size=args.batch_size, num_eval=args.num_eval, seed=args.seed,
        ablations=args.ablations, clip_lr_mult=args.clip_lr_mult or None,
    )
    if args.install:
        print(f"installed as demo: {install(args.output / 'model')}")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
