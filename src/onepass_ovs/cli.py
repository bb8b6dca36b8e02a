"""``ovs-segment``: segment images or folders of images from the command line."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer

# Training-free ViT-B/16 CLIP: works on any vocabulary without a trained head. Offline and
# not cached, loading it fails with a message pointing at `--model demo`.
DEFAULT_MODEL = "clip:ViT-B-16/openai"

segment_app = typer.Typer(add_completion=False, help=__doc__)


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)


@segment_app.command()
def segment(
    inputs: list[Path] = typer.Argument(..., help="Image files and/or folders of images."),
    classes: list[str] = typer.Option(
        ..., "--classes", "-c",
        help='Class names; repeat or list them: --classes cat sofa "tv, television".',
    ),
    model: str = typer.Option(
        DEFAULT_MODEL, "--model", "-m",
        help="Preset name, local folder, 'hf-hub:org/repo[@rev]' or 'clip:<model>/<tag>' "
        "(training-free open_clip ViT, e.g. clip:ViT-B-16/openai).",
    ),
    output_dir: Path = typer.Option(Path("."), "--output-dir", "-o", help="Where outputs go."),
    overlay: bool = typer.Option(False, "--overlay", help="Also write <stem>_overlay.jpg."),
    json_out: bool = typer.Option(False, "--json", help="Print present classes per image as JSON."),
    device: str = typer.Option(None, "--device", help="cpu or cuda (default: cuda if available)."),
    batch_size: int = typer.Option(4, "--batch-size", min=1, help="Images per forward pass."),
    unknown_threshold: float = typer.Option(
        None, "--unknown-threshold", help="Pixels less likely than this become 'unknown' (-1)."
    ),
    background: str = typer.Option(
        None, "--background",
        help="The class meaning 'none of the others' (its synonyms are summed); pixels below "
        "--unknown-threshold get it instead of 'unknown'.",
    ),
    size: str = typer.Option(
        None, "--size",
        help="Working resolution: short side in pixels, or 'original' (large images are "
        "processed in sliding windows).",
    ),
) -> None:
    """Segment IMAGE_OR_DIR... against the given classes; writes <stem>_labels.png each."""
    from . import Segmenter
    from .hub import ModelNotAvailableError
    from .images import list_image_files

    # click gives an option one value, so "--classes a b c" leaves b and c among the
    # positional arguments: words that are not existing paths and have no image suffix or
    # folder part are class names ("--classes a --classes b" works too).
    vocabulary = list(classes)
    files_or_dirs = []
    for item in inputs:
        if not item.exists() and _looks_like_class(item):
            vocabulary.append(str(item))
        else:
            files_or_dirs.append(item)
    try:
        images = list_image_files(files_or_dirs)
    except (FileNotFoundError, ValueError) as err:
        _fail(str(err))
    working_size = None
    if size is not None:
        if size != "original" and not (size.isdigit() and int(size) > 0):
            _fail(f"--size must be a positive number of pixels or 'original', got {size!r}")
        working_size = size if size == "original" else int(size)
    try:
        seg = Segmenter.from_pretrained(model, device=device)
    except ModelNotAvailableError as err:
        _fail(f"{err}" + ("" if model == "demo" else "\nhint: try --model demo (offline)"))
    except ValueError as err:
        _fail(str(err))

    output_dir.mkdir(parents=True, exist_ok=True)
    report = []
    from tqdm.auto import tqdm

    bar = tqdm(total=len(images), desc="segment", unit="img", disable=len(images) < 2, file=sys.stderr)
    try:
        for start in range(0, len(images), batch_size):
            paths = images[start : start + batch_size]
            try:
                results = seg.segment(
                    paths, vocabulary, batch_size=batch_size,
                    unknown_threshold=unknown_threshold, background=background,
                    size=working_size, progress=False,
                )
            except (ValueError, TypeError, OSError) as err:
                _fail(str(err))
            for path, result in zip(paths, results, strict=True):
                labels_path = output_dir / f"{path.stem}_labels.png"
                result.save(labels_path)
                entry = {"image": str(path), "labels": str(labels_path), "classes": result.fractions()}
                if overlay:
                    overlay_path = output_dir / f"{path.stem}_overlay.jpg"
                    result.overlay(path).save(overlay_path, quality=92)
                    entry["overlay"] = str(overlay_path)
                report.append(entry)
                bar.update(1)
    finally:
        bar.close()
    if json_out:
        typer.echo(json.dumps(report if len(report) > 1 else report[0], indent=2))
    else:
        for entry in report:
            top = ", ".join(f"{n} {f:.1%}" for n, f in list(entry["classes"].items())[:5])
            typer.echo(f"{entry['image']} -> {entry['labels']}  [{top}]")


def _looks_like_class(item: Path) -> bool:
    from .images import IMAGE_SUFFIXES

    return item.suffix.lower() not in IMAGE_SUFFIXES and len(item.parts) == 1


def main() -> None:  # pragma: no cover - console entry point
    segment_app()


if __name__ == "__main__":  # pragma: no cover
    main()
