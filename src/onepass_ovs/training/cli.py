"""``ovs-train``: DeOP's three training stages, SED's and GKC's training from the command line.

    ovs-train prompt    --data DIR --model deop-vit-b16 --clip ViT-B-16/openai --output runs/prompt
    ovs-train proposals --data DIR --model runs/prompt --output runs/proposals
    ovs-train deop      --data DIR --model runs/proposals --output runs/deop --unseen "cow,tree"
    ovs-train sed       --data DIR --model sed-convnext-b \
                        --clip convnext_base_w_320/laion_aesthetic_s13b_b82k --output runs/sed
    ovs-train gkc       --data DIR --model gkc-clip-rn50 --clip RN50/openai --teacher RN50/openai \
                        --scorer ViT-B-32/openai --wordnet --output runs/gkc

Every stage ends with ``--output`` holding ``config.json`` + ``model.safetensors`` (load
it with ``Segmenter.from_pretrained`` or pass it as the next stage's ``--model``), the
run's log and checkpoints under ``--output/training``. Defaults are the paper's
(docs/training.md); ``torchrun --nproc_per_node N $(which ovs-train) ...`` trains on N
processes (rank 0 writes the output).
"""

from __future__ import annotations

import functools
import inspect
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer

from .._cli_common import fail, load_segmenter, open_dataset, parse_names

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode=None,  # plain help: wraps long paths instead of cropping them
    context_settings={"max_content_width": 120},
    help="Train DeOP's stages (prompt -> proposals -> deop), SED (sed) or GKC (gkc) on your own data.",
)

# -- options shared by every stage (typer reads these defaults per command) --------------
DATA = typer.Option(
    None, "--data", help="Dataset folder: classes.txt, images/<stem>.jpg|png, masks/<stem>.png."
)
COCO = typer.Option(None, "--coco-stuff", help="COCO-Stuff-164k root (instead of --data).")
SPLIT = typer.Option("train2017", "--split", help="COCO-Stuff split with --coco-stuff.")
MODEL = typer.Option(
    ..., "--model", "-m",
    help="Start from: a preset (deop-tiny, deop-vit-b16, sed-tiny, sed-convnext-b, gkc-tiny, "
    "gkc-clip-rn50: random init), a saved folder, 'demo' or 'hf-hub:org/repo'.",
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
BACKBONE_LR_MULT = typer.Option(
    0.1, "--backbone-lr-mult", min=0.0, help="lr multiplier of the backbone."
)


def crop_option(help: str) -> Any:
    """The ``--crop-size`` option (default None: the stage's default); ``help`` says the
    stage's default."""
    return typer.Option(None, "--crop-size", min=1, help=help)


# (name, type, option) of the options every stage takes, in --help order
COMMON_OPTIONS: tuple[tuple[str, type, Any], ...] = (
    ("data", Path, DATA), ("coco_stuff", Path, COCO), ("split", str, SPLIT),
    ("model", str, MODEL), ("clip", str, CLIP), ("output", Path, OUTPUT),
    ("steps", int, STEPS), ("batch_size", int, BATCH), ("lr", float, LR),
    ("weight_decay", float, WD), ("grad_clip", float, CLIP_NORM), ("warmup", int, WARMUP),
    ("unseen", str, UNSEEN), ("seed", int, SEED), ("device", str, DEVICE), ("amp", str, AMP),
    ("grad_accum", int, ACCUM), ("checkpoint_every", int, CKPT), ("log_every", int, LOG),
    ("resume", bool, RESUME), ("workers", int, WORKERS), ("progress", bool, PROGRESS),
)  # fmt: skip


def stage_command(function: Callable[..., None]) -> Callable[..., None]:
    """Register ``function(options, **own)`` as an ``ovs-train`` command named after it.

    The command takes :data:`COMMON_OPTIONS` first, then ``function``'s own options (its
    parameters after ``options``); ``function`` gets the common ones as the dict
    ``options`` (name -> value) and its own as keyword arguments.
    """
    positional = inspect.Parameter.POSITIONAL_OR_KEYWORD
    shared = [
        inspect.Parameter(name, positional, default=option, annotation=kind)
        for name, kind, option in COMMON_OPTIONS
    ]
    own = list(inspect.signature(function, eval_str=True).parameters.values())[1:]
    parameters = shared + [p.replace(kind=positional) for p in own]

    @functools.wraps(function)
    def command(**values: Any) -> None:
        options = {name: values.pop(name) for name, _, _ in COMMON_OPTIONS}
        function(options, **values)

    command.__signature__ = inspect.Signature(parameters, return_annotation=None)
    command.__annotations__ = {p.name: p.annotation for p in parameters}
    return app.command()(command)


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
    if stage == "gkc":
        try:
            stage_options["synonym_sources"] = _synonym_sources(
                dataset.classes, **stage_options.pop("synonym_spec")
            )
        except (DatasetError, ImportError, FileNotFoundError, ValueError) as err:
            fail(str(err))
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
             "deop": stages.train_deop, "sed": stages.train_sed,
             "gkc": stages.train_gkc}[stage]  # fmt: skip
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


@stage_command
def prompt(
    options: dict[str, Any],
    prompt_length: int = typer.Option(
        None,
        "--prompt-length",
        min=1,
        help="Learned context vectors to add when the model has none (default 16, or a "
        "quarter of a shorter text context).",
    ),
    crop_size: int = crop_option("Region crop side (default: CLIP's input size)."),
    min_region_pixels: int = typer.Option(
        64, "--min-region-pixels", min=1, help="Smallest region that becomes a sample."
    ),
) -> None:
    """Stage 1: learn the prompt context (CoOp) on crops of ground-truth regions.

    Defaults: SGD lr 0.02, momentum 0.9, wd 5e-4, cosine, 16k steps, batch 32.
    """
    stage_options = {
        "prompt_length": prompt_length,
        "crop_size": crop_size,
        "min_region_pixels": min_region_pixels,
    }
    run("prompt", options, stage_options)


@stage_command
def proposals(
    options: dict[str, Any],
    crop_size: int = crop_option("Square crop side, a multiple of 32 (default 1.25 x the model's short side: 640)."),
    backbone_lr_mult: float = BACKBONE_LR_MULT,
) -> None:
    """Stage 2: train the MaskFormer proposal generator by bipartite matching.

    Defaults: AdamW lr 1e-4, wd 1e-4, poly 0.9, backbone lr x0.1, grad-norm clip 0.01,
    60k steps, batch 32; crops 640 from short side 320..960, colour jitter, flip.
    """
    stage_options = {
        "crop_size": crop_size,
        "config_overrides": {
            "lr_multipliers": {"proposals.backbone": backbone_lr_mult}
        },
    }
    run("proposals", options, stage_options)


@stage_command
def deop(
    options: dict[str, Any],
    crop_size: int = crop_option("Exact square crop side, a multiple of 32 (default: the model's short side, 512)."),
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
    stage_options = {
        "crop_size": crop_size,
        "train_prompt": train_prompt,
        "clip_lr_mult": clip_lr_mult,
    }
    run("deop", options, stage_options)


@stage_command
def sed(
    options: dict[str, Any],
    crop_size: int = crop_option("Square crop side, a multiple of 32 (default: the model's short side, 768)."),
    clip_lr_mult: float = typer.Option(
        0.01, "--clip-lr-mult", min=0.0, help="lr multiplier of the CLIP image tower."
    ),
) -> None:
    """Train SED: the decoder and the CLIP image tower (the text tower stays frozen).

    Start from a SED preset with --clip naming an open_clip ConvNeXt CLIP (e.g.
    convnext_base_w_320/laion_aesthetic_s13b_b82k for sed-convnext-b), or from a saved SED.
    Defaults: AdamW lr 2e-4, wd 1e-4, cosine, CLIP image tower lr x0.01, grad-norm clip
    0.01, 80k steps, batch 4; BCE on the final and three auxiliary outputs; square crops
    768 from the short side resized to 768, colour jitter, flip.
    """
    stage_options = {
        "crop_size": crop_size,
        "config_overrides": {"lr_multipliers": {"clip_visual": clip_lr_mult}},
    }
    run("sed", options, stage_options)


def _synonym_sources(
    class_names: list[str],
    *,
    json_path: Path | None,
    wordnet: bool,
    wordnet_dir: Path | None,
    shapes: bool,
) -> list[dict[str, list[str]]]:
    """The synonym sources named on the command line, in the order JSON, WordNet, shapes."""
    from ..data.classes import class_synonyms
    from ..data.synonyms import read_synonym_json, shapes_world_synonyms, wordnet_synonyms

    sources = []
    if json_path is not None:
        sources.append(read_synonym_json(json_path))
    if wordnet or wordnet_dir is not None:
        names = [n for full in class_names for n in class_synonyms(full)]
        sources.append(wordnet_synonyms(names, wordnet_dir))
    if shapes:
        sources.append(shapes_world_synonyms(class_names))
    return sources


@stage_command
def gkc(
    options: dict[str, Any],
    crop_size: int = crop_option("Square crop side, a multiple of 32 (default: the model's short side, 512)."),
    backbone_lr_mult: float = BACKBONE_LR_MULT,
    teacher: str = typer.Option(
        None,
        "--teacher",
        help="Distillation teacher CLIP, named as --clip (the paper's: RN50/openai) or "
        "'demo' / a saved folder. Needed unless --no-distill.",
    ),
    scorer: str = typer.Option(
        None,
        "--scorer",
        help="CLIP scoring the synonyms offline (the authors': ViT-B-32/openai); default the teacher.",
    ),
    synonyms_json: Path = typer.Option(
        None, "--synonyms-json", help='Synonyms file: {"class": ["synonym", ...]}.'
    ),
    wordnet: bool = typer.Option(
        False, "--wordnet", help="Add WordNet noun lemmas (needs nltk and a WordNet 3.0 database)."
    ),
    wordnet_dir: Path = typer.Option(
        None, "--wordnet-dir", help="WordNet 3.0 database folder (implies --wordnet)."
    ),
    shapes_synonyms: bool = typer.Option(
        False, "--shapes-synonyms", help="Add the built-in shapes-world synonyms."
    ),
    region_view: str = typer.Option(
        "box",
        "--region-view",
        help="How the teacher and scorer see a region: 'box' (the authors' crop to the mask's "
        "box) or 'in_place' (the whole image, the rest grey; for a CLIP that never saw "
        "magnified objects).",
    ),
    synonyms: bool = typer.Option(
        True, "--synonyms/--no-synonyms", help="Text diversification (off: class names only)."
    ),
    distill: bool = typer.Option(
        True, "--distill/--no-distill", help="Text-guided knowledge distillation."
    ),
    plain_loss: bool = typer.Option(
        True, "--plain-loss/--no-plain-loss", help="Keep the plain class-name loss."
    ),
    cache_dir: Path = typer.Option(
        None,
        "--cache-dir",
        help="Where synonym scores and teacher embeddings are cached (default OUTPUT/training).",
    ),
) -> None:
    """Train GKC: Mask2Former + CLIP text classifier, synonyms and text-guided distillation.

    Defaults: AdamW lr 1e-4, wd 0.05, poly 0.9, backbone lr x0.1, grad-norm clip 0.01,
    50k steps, batch 16; crops from short side 0.8x..1.2x, flip. See docs/gkc.md.
    """
    stage_options = {
        "crop_size": crop_size,
        "teacher": teacher,
        "scorer": scorer,
        "region_view": region_view,
        "use_synonyms": synonyms,
        "distill": distill,
        "plain_loss": plain_loss,
        "cache_dir": cache_dir,
        "synonym_spec": {
            "json_path": synonyms_json,
            "wordnet": wordnet,
            "wordnet_dir": wordnet_dir,
            "shapes": shapes_synonyms,
        },
        "config_overrides": {"lr_multipliers": {"backbone": backbone_lr_mult}},
    }
    if region_view not in ("box", "in_place"):
        fail(f"--region-view must be 'box' or 'in_place', got {region_view!r}")
    if stage_options["distill"] and stage_options["teacher"] is None:
        fail("--teacher is needed for distillation (e.g. --teacher RN50/openai), or --no-distill")
    run("gkc", options, stage_options)


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover - torchrun -m onepass_ovs.training.cli
    main()
