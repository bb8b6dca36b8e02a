"""The shapes-world recipe that builds the offline ``demo`` model, end to end.

    python -m onepass_ovs.toy.build --output runs/demo                # everything, fixed seeds
    python -m onepass_ovs.toy.build --output runs/demo --ablations    # ... and the ablation rows
    python -m onepass_ovs.toy.build --output runs/demo --install      # ... and ship it as `demo`
    python -m onepass_ovs.toy.build --output /tmp/q --quick --ablations  # smoke run, minutes

Steps (docs/shapes_world.md):

1. pretrain the tiny CLIP (ViT with a convolutional stem) contrastively on (scene,
   caption) pairs -- image-level captions only, all 30 classes and the background
   (``toy.clip.pretrain_tiny_clip``), and measure it (``evaluate_tiny_clip``);
2. export segmentation training scenes (folder format); the 6 unseen classes become
   ignore through the dataset's ``unseen=`` (the open-vocabulary protocol);
3. build the demo DeOP architecture around the tiny CLIP (its conv stem travels in the
   config);
4. train the proposal generator (``ovs-train proposals``' function) on seen classes;
5. train DeOP's heads (``ovs-train deop``' function): CAL, learned positions, void, with
   the CLIP frozen as the paper does (``--clip-lr-mult`` > 0 fine-tunes its image tower);
6. evaluate on freshly rendered scenes with all 31 names (seen / unseen / hIoU);
7. write a normal pretrained folder (fp16 weights), and with ``--install`` copy it into
   the package as the ``demo`` preset.

``--ablations`` also trains, from the same CLIP and proposals: no patch severance; each
severance variant (weighted = the main model, identity, mask-guided); mask-average
pooling instead of CAL; the CLIP image tower fine-tuned (``--ablation-clip-lr-mult``) when
the main model keeps it frozen, or frozen when it is fine-tuned; and evaluates the
two-stream baseline (the main model's proposals, a CLIP pass per crop) and the
training-free family on the pretrained tiny CLIP (ClearCLIP severance and none).

Every step's wall time and metrics go to ``summary.json`` in the output folder (rewritten
after each step, so a failed run keeps what it finished). Seeds: the CLIP's scene streams
and its evaluation streams are in ``toy.clip``; segmentation training scenes are
``render_scenes`` stream ``TRAIN_SEED + seed``, evaluation scenes stream ``EVAL_SEED``
(``benchmarks/shapes.py`` uses ``EVAL_SEED + 1``); none is used for training elsewhere.
Global torch thread counts are left alone: set ``OMP_NUM_THREADS``.
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
    """The demo architecture: DeOP's code path at shapes-world sizes.

    ``clip_cfg`` is the tiny CLIP's model config; its ``"conv_stem"`` (if any) becomes
    ``clip.conv_stem`` and travels in the saved config.
    """
    vision = clip_cfg["vision_cfg"]
    grid = 128 // vision["patch_size"]
    layers = vision["layers"]
    return ModelConfig(
        family="deop",
        name="demo",
        preprocess=PreprocessConfig(short_side=128, max_long_side=512, pad_multiple=32, window=256),
        clip=ClipConfig(
            model_name="ovs-shapes-clip",
            model_cfg=copy.deepcopy(clip_cfg),
            conv_stem=tuple(int(c) for c in clip_cfg.get("conv_stem") or ()),
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


#: ``--quick``: tiny step and scene counts, end to end in a couple of minutes on a CPU.
QUICK = {
    "clip_steps": 6,
    "clip_batch_size": 16,
    "clip_full_res_batch_size": 8,
    "clip_eval": {"scenes_per_class": 1, "num_region_scenes": 6},
    "num_train": 16,
    "proposal_steps": 3,
    "deop_steps": 3,
    "batch_size": 2,
    "num_eval": 4,
}
METRIC_KEYS = ("miou", "miou_seen", "miou_unseen", "hiou", "images_per_second")


class _Summary:
    """``summary.json``: per-step seconds and metrics, rewritten after every step."""

    def __init__(self, path: Path, settings: dict):
        self.path = path
        self.data = {"settings": settings, "steps": {}, "models": {}}

    def step(self, name: str, seconds: float, **values) -> None:
        self.data["steps"][name] = {"seconds": round(seconds, 2), **values}
        self.write()

    def model(self, name: str, metrics: dict, seconds: float) -> None:
        row = {k: round(float(metrics[k]), 4) for k in METRIC_KEYS if k in metrics}
        self.data["models"][name] = {**row, "eval_seconds": round(seconds, 2)}
        self.write()

    def write(self) -> None:
        self.path.write_text(json.dumps(self.data, indent=2) + "\n")

    def finish(self, start: float) -> dict:
        """Record the total wall time since ``start`` (``time.perf_counter()``), write, and
        return the summary."""
        self.data["total_seconds"] = round(time.perf_counter() - start, 2)
        self.write()
        print(f"done in {self.data['total_seconds']:.0f} s; summary: {self.path}", flush=True)
        return self.data


def save_fp16(segmenter, folder: Path) -> None:
    """Save ``segmenter`` as a pretrained folder with fp16 weights (the shipped demos'
    size); the model in memory stays float32."""
    segmenter.model.half()
    segmenter.save_pretrained(folder)
    segmenter.model.float()


def training_dataset(work: Path, num_train: int, seed: int, summary: _Summary):
    """The segmentation training scenes (rendered once into ``work/train_scenes``, stream
    ``TRAIN_SEED + seed``) as a dataset whose unseen classes are ignore."""
    from ..data import FolderDataset
    from .export import export_folder

    start = time.perf_counter()
    train_dir = work / "train_scenes"
    if not (train_dir / "classes.txt").exists():
        print(f"rendering {num_train} training scenes -> {train_dir}", flush=True)
        export_folder(train_dir, num_train, TRAIN_SEED + seed)
    dataset = FolderDataset(train_dir, unseen=list(scenes.UNSEEN_CLASSES))
    summary.step("train_scenes", time.perf_counter() - start, count=num_train)
    return dataset


def _last_logged(run_dir: Path) -> dict:
    """The last entry of an engine run's ``train_log.jsonl`` ({} if none); a training
    stage's run lies in its ``training/`` subfolder."""
    log = Path(run_dir) / "train_log.jsonl"
    if not log.is_file():
        log = Path(run_dir) / "training" / "train_log.jsonl"
    lines = [line for line in log.read_text().splitlines() if line.strip()] if log.is_file() else []
    return {k: v for k, v in json.loads(lines[-1]).items() if k != "time"} if lines else {}


def build(
    output: Path,
    *,
    clip_dir: Path | None = None,
    clip_steps: int = 2000,
    clip_batch_size: int = 128,
    clip_full_res_batch_size: int = 64,
    clip_eval: dict | None = None,
    num_train: int = 2000,
    proposal_steps: int = 1000,
    deop_steps: int = 800,
    clip_lr_mult: float | None = None,
    ablation_clip_lr_mult: float = 0.1,
    batch_size: int = 8,
    num_eval: int = 200,
    seed: int = 0,
    ablations: bool = False,
    device: str = "cpu",
    clip_num_workers: int = 0,
    progress: bool = True,
) -> dict:
    """Run the recipe; returns the summary (also written as ``summary.json``).

    ``clip_lr_mult`` None / 0 keeps the CLIP frozen in the main DeOP model (the paper);
    ``clip_eval`` holds ``evaluate_tiny_clip`` sizes (default its own).
    """
    from .. import Segmenter
    from ..models.two_stream import TwoStreamBaseline
    from ..training.stages import default_config, train_deop, train_proposals
    from .clip import evaluate_tiny_clip, load_tiny_clip, pretrain_tiny_clip

    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    work = output / "work"
    settings = {
        "clip_dir": str(clip_dir) if clip_dir else None, "clip_steps": clip_steps,
        "clip_batch_size": clip_batch_size, "num_train": num_train,
        "proposal_steps": proposal_steps, "deop_steps": deop_steps,
        "clip_lr_mult": clip_lr_mult or 0.0, "ablation_clip_lr_mult": ablation_clip_lr_mult,
        "batch_size": batch_size, "num_eval": num_eval, "seed": seed, "ablations": ablations,
        "device": device, "torch_threads": torch.get_num_threads(),
        "train_seed": TRAIN_SEED + seed, "eval_seed": EVAL_SEED,
    }
    summary = _Summary(output / "summary.json", settings)
    start = time.perf_counter()

    # 1. tiny CLIP
    t = time.perf_counter()
    if clip_dir is None:
        clip_dir = work / "clip"
        print(f"[1/7] pretraining the tiny CLIP ({clip_steps} steps) -> {clip_dir}", flush=True)
        pretrain_tiny_clip(
            clip_dir, steps=clip_steps, batch_size=clip_batch_size,
            full_res_batch_size=clip_full_res_batch_size, seed=seed, evaluate=False,
            progress=progress, resume="auto", device=device, num_workers=clip_num_workers,
        )
    else:
        print(f"[1/7] using the pretrained tiny CLIP in {clip_dir}", flush=True)
    clip_train_seconds = time.perf_counter() - t
    clip = load_tiny_clip(clip_dir).to(device)
    clip_cfg = json.loads((Path(clip_dir) / "open_clip_config.json").read_text())["model_cfg"]
    t = time.perf_counter()
    clip_metrics = evaluate_tiny_clip(clip, **(clip_eval or {}))
    summary.step(
        "clip", clip_train_seconds, eval_seconds=round(time.perf_counter() - t, 2),
        conv_stem=clip_cfg.get("conv_stem", []), metrics=clip_metrics,
        train=_last_logged(clip_dir),
    )
    print(f"      tiny CLIP: {json.dumps(clip_metrics)}", flush=True)

    # 2. segmentation training scenes
    print("[2/7] segmentation training scenes", flush=True)
    dataset = training_dataset(work, num_train, seed, summary)

    # 3. the demo architecture around the tiny CLIP
    torch.manual_seed(seed)
    segmenter = Segmenter.from_config(demo_config(clip_cfg), device=device, seed=seed)
    segmenter.model.load_clip_weights(clip)

    # 4. proposals
    print(f"[3/7] training the proposal generator ({proposal_steps} steps)", flush=True)
    t = time.perf_counter()
    proposals_dir = work / "proposals"
    proposals_cfg = default_config(
        "proposals", steps=proposal_steps, batch_size=batch_size, lr=5e-4, seed=seed,
        output_dir=str(proposals_dir), checkpoint_every=500, log_every=min(50, proposal_steps),
        device=device, progress_bar=progress,
    )
    segmenter = train_proposals(segmenter, dataset, proposals_cfg, crop_size=128, resume="auto")
    summary.step("proposals", time.perf_counter() - t, train=_last_logged(proposals_dir))

    # 5. DeOP heads (and the ablations, from the same CLIP and proposals)
    main_mult = clip_lr_mult or None
    variants: dict[str, tuple[dict, float | None]] = {"deop": ({}, main_mult)}
    if ablations:
        variants["no_severance"] = ({"clip.severance": "none"}, main_mult)
        variants["severance_identity"] = ({"clip.severance": "identity"}, main_mult)
        variants["severance_mask_guided"] = ({"clip.severance": "mask-guided"}, main_mult)
        variants["mask_average"] = ({"deop.anchors.pooling": "mask_average"}, main_mult)
        if main_mult:
            variants["clip_frozen"] = ({}, None)
        else:
            variants["clip_finetuned"] = ({}, ablation_clip_lr_mult)
    trained: dict = {}
    for name, (changes, mult) in variants.items():
        print(f"[4/7] training DeOP heads: {name} ({deop_steps} steps, clip lr x{mult or 0})", flush=True)
        t = time.perf_counter()
        cfg = segmenter.config.replace(**changes) if changes else segmenter.config
        base = Segmenter.from_config(cfg, device=device, seed=seed)
        base.model.load_state_dict(segmenter.model.state_dict(), strict=False)
        run_dir = work / f"deop_{name}"
        deop_cfg = default_config(
            "deop", steps=deop_steps, batch_size=batch_size, lr=1e-3, seed=seed,
            output_dir=str(run_dir), checkpoint_every=500, log_every=min(50, deop_steps),
            device=device, progress_bar=progress,
        )
        trained[name] = train_deop(
            base, dataset, deop_cfg, crop_size=128, clip_lr_mult=mult, resume="auto"
        )
        summary.step(
            f"deop_{name}", time.perf_counter() - t, changes=changes, clip_lr_mult=mult or 0.0,
            train=_last_logged(run_dir),
        )

    # 6. evaluation on fresh scenes
    print(f"[5/7] evaluating on {num_eval} fresh scenes (all 31 names)", flush=True)
    rows = dict(trained)
    if ablations:
        main = trained["deop"]
        rows["two_stream"] = Segmenter(TwoStreamBaseline(main.model), device=device)
        for severance in ("clearclip", "none"):
            free = Segmenter.from_clip(
                str(Path(clip_dir).resolve()), severance=severance, templates="single", device=device
            )
            # the tiny CLIP works at the scenes' size, not the family's 448 px default
            pre = free.config.preprocess
            pre.short_side, pre.max_long_side, pre.window = 128, 512, 128
            rows[f"training_free_{severance}"] = free
    for name, seg in rows.items():
        t = time.perf_counter()
        metrics = evaluate_on_fresh_scenes(seg, work / "eval_scenes", num_eval)
        summary.model(name, metrics, time.perf_counter() - t)
        print(f"      {name}: {json.dumps(summary.data['models'][name])}", flush=True)

    # 7. the pretrained folders (fp16 storage keeps the demo small)
    print(f"[6/7] writing {output / 'model'}", flush=True)
    t = time.perf_counter()
    for name, seg in trained.items():
        save_fp16(seg, output / ("model" if name == "deop" else f"ablations/{name}"))
    summary.step("write", time.perf_counter() - t)
    print("[7/7] ", end="")
    return summary.finish(start)


def install(model_dir: Path, preset: str = "demo") -> Path:
    """Copy a built model folder into the package as a pretrained preset (``demo``,
    ``demo-sed``, ``demo-gkc``)."""
    from ..hub import package_weights_dir

    target = package_weights_dir(preset)
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
    parser.add_argument("--clip-lr-mult", type=float, default=0.0,
                        help="fine-tune the CLIP image tower at this lr multiplier (0 = frozen, "
                             "the paper)")
    parser.add_argument("--ablation-clip-lr-mult", type=float, default=0.1,
                        help="lr multiplier of the fine-tuned-CLIP ablation")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--num-eval", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--clip-workers", type=int, default=0,
                        help="loader processes rendering the tiny CLIP's scenes (GPU runs)")
    parser.add_argument("--ablations", action="store_true")
    parser.add_argument("--quick", action="store_true",
                        help="tiny step and scene counts: an end-to-end smoke run")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--install", action="store_true", help="ship the result as `demo`")
    args = parser.parse_args(argv)
    sizes = dict(
        clip_steps=args.clip_steps, num_train=args.num_train,
        proposal_steps=args.proposal_steps, deop_steps=args.deop_steps,
        batch_size=args.batch_size, num_eval=args.num_eval,
    )
    if args.quick:
        sizes = dict(QUICK)
    summary = build(
        args.output, clip_dir=args.clip, clip_lr_mult=args.clip_lr_mult or None,
        ablation_clip_lr_mult=args.ablation_clip_lr_mult, seed=args.seed,
        ablations=args.ablations, device=args.device, clip_num_workers=args.clip_workers,
        progress=not args.no_progress, **sizes,
    )
    if args.install:
        print(f"installed as demo: {install(args.output / 'model')}")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
