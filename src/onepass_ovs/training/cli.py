"""``ovs-train``: DeOP's three training stages from the command line.

    ovs-train prompt    --data DIR --model deop-vit-b16 --clip ViT-B-16/openai --output runs/prompt
    ovs-train proposals --data DIR --model runs/prompt --output runs/proposals
    ovs-train deop      --data DIR --model runs/proposals --output runs/deop --unseen "cow,tree"

Every stage ends with ``--output`` holding ``config.json`` + ``model.safetensors`` (load
it with ``Segmenter.from_pretrained`` or pass it as the next stage's ``--model``), the
run's log and checkpoints under ``--output/training``. Defaults are the paper's
(docs/training.md); ``torchrun --nproc_per_node N $(which ovs-train) ...`` trains on N
processes (rank 0 writes the output).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import typer

from .._cli_common import fail, load_segmenter, open_dataset, parse_names

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode=None,  # plain help: wraps long paths instead of cropping them
    context_settings={"max_content_width": 120},
    help="Train DeOP's stages (prompt -> proposals -> deop) on your own data.",
)

# -- options shared by every stage (typer reads these defaults per command) --------------
DATA = typer.Option(
    None, "--data", help="Dataset folder: classes.txt, images/<stem>.jpg|png, masks/<stem>.png."
)
COCO = typer.Option(None, "--coco-stuff", help="COCO-Stuff-164k root (instead of --data).")
SPLIT = typer.Option("train2017", "--split", help="COCO-Stuff split with --coco-stuff.")
MODEL = typer.Option(
    ..., "--model", "-m",
    help="Start from: a preset (deop-tiny, deop-vit-b16: random init), a saved folder, "
    "'demo' or 'hf-hub:org/repo'.",
)  # fmt: skip
CLIP = typer.Option(
    None,
    "--clip",
    help="Initialise the CLIP parts from open_clip safetensors weights first, named as for "
    "'ovs-segment --model clip:...': ViT-B-16/openai, hf-hub:org/repo or local-dir:/path.",
)
OUTPUT = typer.Option(..., "--output", "-o", help="Output folder (a loadable model at the end).")
STEPS = typer.Option(None, "--steps", min=1, help="Optimizer steps (default: the paper's).")
BATCH = typer.Option(None, "--batch-size", min=1, help="Samples per process per step.")
LR = typer.Option(None, "--lr", min=0.0, help="Base learning rate (default: the paper's).")
WD = typer.Option(None, "--weight-decay", min=0.0, help="Weight decay (default: the paper's).")
CLIP_NORM = typer.Option(
    None, "--grad-clip", min=0.0, help="Gradient-norm clip (0 = off; default: the paper's)."
)
WARMUP = typer.Option(0, "--warmup", min=0, help="Linear lr warmup steps.")
UNSEEN = typer.Option(
    None, "--unseen", help='Classes to hold out, comma-separated: "cow,tree" (become ignore).'
)
SEED = typer.Option(0, "--seed", help="Seed of initialisation, data order and augmentation.")
DEVICE = typer.Option(None, "--device", help="cpu or cuda (default: cuda if available).")
AMP = typer.Option("none", "--amp", help="Mixed precision: none or bf16.")
ACCUM = typer.Option(1, "--grad-accum", min=1, help="Micro-batches per optimizer step.")
CKPT = typer.Option(1000, "--checkpoint-every", min=0, help="Checkpoint every N steps (0 = end).")
LOG = typer.Option(20, "--log-every", min=1, help="Log (and update the bar's loss) every N steps.")
RESUME = typer.Option(
    False, "--resume", help="Continue from the newest checkpoint in --output (fresh if none)."
)
WORKERS = typer.Option(2, "--workers", min=0, help="Data loader worker processes.")
PROGRESS = typer.Option(True, "--progress/--no-progress", help="Show the progress bar.")
CROP = typer.Option(None, "--crop-size", min=1, help="Training crop side (see the stage's help).")


def _setup_logging() -> None:
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("onepass_ovs").setLevel(logging.INFO)


def run(stage: str, options: dict[str, Any], stage_options: dict[str, Any]) -> None:
    """Build data, model and config from the parsed options, then train ``stage``."""
    from ..data import DatasetError
    from . import stages
    from .distributed import destroy_distributed, init_distributed

    _setup_logging()
    if options["amp"] not in ("none", "bf16"):
        fail(f"--amp must be 'none' or 'bf16', got {options['amp']!r}")
    dataset = open_dataset(
        options["data"], options["coco_stuff"], options["split"], parse_names(options["unseen"])
    )
    segmenter = load_segmenter(options["model"], seed=options["seed"], device="cpu")
    if options["clip"]:
        try:
            stages.load_clip_weights(segmenter, options["clip"])
        except ValueError as err:
            fail(str(err))

    overrides: dict[str, Any] = {
        "output_dir": str(options["output"]),
        "seed": options["seed"],
        "device": options["device"],
        "amp": options["amp"],
        "grad_accum_steps": options["grad_accum"],
        "checkpoint_every": options["checkpoint_every"],
        "log_every": options["log_every"],
        "num_workers": options["workers"],
        "warmup_steps": options["warmup"],
        "progress_bar": options["progress"],
    }
    for key, option in (("steps", "steps"), ("batch_size", "batch_size"), ("lr", "lr"),
                        ("weight_decay", "weight_decay")):  # fmt: skip
        if options[option] is not None:
            overrides[key] = options[option]
    if options["grad_clip"] is not None:
        overrides["grad_clip_norm"] = options["grad_clip"] or None
    overrides.update(stage_options.pop("config_overrides", {}))
    try:
        config = stages.default_config(stage, **overrides)
    except (TypeError, ValueError) as err:
        fail(str(err))

    train = {"prompt": stages.train_prompt, "proposals": stages.train_proposals,
             "deop": stages.train_deop}[stage]  # fmt: skip
    resume = "auto" if options["resume"] else False
    try:
        train(segmenter, dataset, config, resume=resume, **stage_options)
    except (DatasetError, FileExistsError, FileNotFoundError) as err:
        fail(str(err))
    except ValueError as err:
        fail(str(err))
    dist = init_distributed(options["device"])
    if dist.is_main:
        output = options["output"]
        typer.echo(f"saved the trained model to {output}")
        typer.echo(f"evaluate it: ovs-eval --model {output} --data <DIR> [--unseen ...]")
    destroy_distributed()


@app.command()
def prompt(
    data: Path = DATA,
    coco_stuff: Path = COCO,
    split: str = SPLIT,
    model: str = MODEL,
    clip: str = CLIP,
    output: Path = OUTPUT,
    steps: int = STEPS,
    batch_size: int = BATCH,
    lr: float = LR,
    weight_decay: float = WD,
    grad_clip: float = CLIP_NORM,
    warmup: int = WARMUP,
    unseen: str = UNSEEN,
    seed: int = SEED,
    device: str = DEVICE,
    amp: str = AMP,
    grad_accum: int = ACCUM,
    checkpoint_every: int = CKPT,
    log_every: int = LOG,
    resume: bool = RESUME,
    workers: int = WORKERS,
    progress: bool = PROGRESS,
    prompt_length: int = typer.Option(
        None,
        "--prompt-length",
        min=1,
        help="Learned context vectors to add when the model has none (default 16, or a "
        "quarter of a shorter text context).",
    ),
    crop_size: int = typer.Option(
        None, "--crop-size", min=1, help="Region crop side (default: CLIP's input size)."
    ),
    min_region_pixels: int = typer.Option(
        64, "--min-region-pixels", min=1, help="Smallest region that becomes a sample."
    ),
) -> None:
    """Stage 1: learn the prompt context (CoOp) on crops of ground-truth regions.

    Defaults: SGD lr 0.02, momentum 0.9, wd 5e-4, cosine, 16k steps, batch 32.
    """
    options = dict(locals())
    stage_options = {
        "prompt_length": options.pop("prompt_length"),
        "crop_size": options.pop("crop_size"),
        "min_region_pixels": options.pop("min_region_pixels"),
    }
    run("prompt", options, stage_options)


@app.command()
def proposals(
    data: Path = DATA,
    coco_stuff: Path = COCO,
    split: str = SPLIT,
    model: str = MODEL,
    clip: str = CLIP,
    output: Path = OUTPUT,
    steps: int = STEPS,
    batch_size: int = BATCH,
    lr: float = LR,
    weight_decay: float = WD,
    grad_clip: float = CLIP_NORM,
    warmup: int = WARMUP,
    unseen: str = UNSEEN,
    seed: int = SEED,
    device: str = DEVICE,
    amp: str = AMP,
    grad_accum: int = ACCUM,
    checkpoint_every: int = CKPT,
    log_every: int = LOG,
    resume: bool = RESUME,
    workers: int = WORKERS,
    progress: bool = PROGRESS,
    crop_size: int = typer.Option(
        None,
        "--crop-size",
        min=1,
        help="Square crop side, a multiple of 32 (default 1.25 x the model's short side: 640).",
    ),
    backbone_lr_mult: float = typer.Option(
        0.1, "--backbone-lr-mult", min=0.0, help="lr multiplier of the backbone."
    ),
) -> None:
    """Stage 2: train the MaskFormer proposal generator by bipartite matching.

    Defaults: AdamW lr 1e-4, wd 1e-4, poly 0.9, backbone lr x0.1, grad-norm clip 0.01,
    60k steps, batch 32; crops 640 from short side 320..960, colour jitter, flip.
    """
    options = dict(locals())
    stage_options = {
        "crop_size": options.pop("crop_size"),
        "config_overrides": {
            "lr_multipliers": {"proposals.backbone": options.pop("backbone_lr_mult")}
        },
    }
    run("proposals", options, stage_options)


@app.command()
def deop(
    data: Path = DATA,
    coco_stuff: Path = COCO,
    split: str = SPLIT,
    model: str = MODEL,
    clip: str = CLIP,
    output: Path = OUTPUT,
    steps: int = STEPS,
    batch_size: int = BATCH,
    lr: float = LR,
    weight_decay: float = WD,
    grad_clip: float = CLIP_NORM,
    warmup: int = WARMUP,
    unseen: str = UNSEEN,
    seed: int = SEED,
    device: str = DEVICE,
    amp: str = AMP,
    grad_accum: int = ACCUM,
    checkpoint_every: int = CKPT,
    log_every: int = LOG,
    resume: bool = RESUME,
    workers: int = WORKERS,
    progress: bool = PROGRESS,
    crop_size: int = typer.Option(
        None,
        "--crop-size",
        min=1,
        help="Exact square crop side, a multiple of 32 (default: the model's short side, 512).",
    ),
    train_prompt: bool = typer.Option(
        False, "--train-prompt", help="Also train the learned prompt context."
    ),
    clip_lr_mult: float = typer.Option(
        None,
        "--clip-lr-mult",
        min=0.0,
        help="Unfreeze the CLIP image tower with this lr multiplier (default: frozen).",
    ),
) -> None:
    """Stage 3: train CAL, the learned positions and the void embedding (proposals frozen).

    Defaults: AdamW lr 2e-4, wd 1e-4 (none on norms/embeddings/positions), poly 0.9,
    grad-norm clip 0.01, 60k steps, batch 16; crops exactly 512 x 512.
    """
    options = dict(locals())
    stage_options = {
        "crop_size": options.pop("crop_size"),
        "train_prompt": options.pop("train_prompt"),
        "clip_lr_mult": options.pop("clip_lr_mult"),
    }
    run("deop", options, stage_options)


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover - torchrun -m onepass_ovs.training.cli
    main()
