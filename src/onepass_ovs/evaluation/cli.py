"""``ovs-eval``: mIoU of a model on a labelled dataset (folder format or COCO-Stuff).

ovs-eval --model runs/deop --data DIR --unseen "cow,tree" --json
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import typer

app = typer.Typer(add_completion=False, help=__doc__)


@app.command()
def evaluate_model(
    model: str = typer.Option(
        ..., "--model", "-m", help="A saved folder, 'demo', 'hf-hub:org/repo' or a preset."
    ),
    data: Path = typer.Option(
        None, "--data", help="Dataset folder: classes.txt, images/, masks/ (all classes labelled)."
    ),
    coco_stuff: Path = typer.Option(None, "--coco-stuff", help="COCO-Stuff-164k root."),
    split: str = typer.Option("val2017", "--split", help="COCO-Stuff split with --coco-stuff."),
    unseen: str = typer.Option(
        None, "--unseen", help="Unseen classes, comma-separated: adds seen/unseen mIoU and hIoU."
    ),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object."),
    batch_size: int = typer.Option(4, "--batch-size", min=1, help="Images per forward pass."),
    device: str = typer.Option(None, "--device", help="cpu or cuda (default: cuda if available)."),
    limit: int = typer.Option(None, "--limit", min=1, help="Evaluate the first N images only."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
) -> None:
    """Segment every image of the dataset with its class list as the vocabulary and
    report mIoU, per-class IoU and pixel accuracy (percent)."""
    from .._cli_common import fail, load_segmenter, open_dataset, parse_names
    from ..data import DatasetError
    from .evaluate import evaluate, to_json_safe

    dataset = open_dataset(data, coco_stuff, split, None)
    segmenter = load_segmenter(model, device=device)
    try:
        result = evaluate(
            segmenter,
            dataset,
            unseen=parse_names(unseen),
            batch_size=batch_size,
            progress=progress and not json_out,
            limit=limit,
        )
    except (DatasetError, ValueError) as err:
        fail(str(err))
    result["model"] = model
    if json_out:
        typer.echo(json.dumps(to_json_safe(result), allow_nan=False))
        return
    typer.echo(format_table(result))


def format_table(result: dict) -> str:
    """A readable report: one row per class, then the summary metrics."""

    def pct(value) -> str:
        return "   -" if value is None or math.isnan(value) else f"{value:5.1f}"

    unseen = set(result.get("unseen", []))
    width = max(12, *(len(name) for name in result["per_class"]))
    lines = [f"{'class':<{width}}  IoU %", "-" * (width + 8)]
    for name, iou in result["per_class"].items():
        mark = "  (unseen)" if name in unseen else ""
        lines.append(f"{name:<{width}}  {pct(iou)}{mark}")
    lines.append("-" * (width + 8))
    lines.append(f"{'mIoU':<{width}}  {pct(result['miou'])}")
    if "hiou" in result:
        lines.append(f"{'mIoU seen':<{width}}  {pct(result['miou_seen'])}")
        lines.append(f"{'mIoU unseen':<{width}}  {pct(result['miou_unseen'])}")
        lines.append(f"{'hIoU':<{width}}  {pct(result['hiou'])}")
    lines.append(f"{'pixel acc.':<{width}}  {pct(result['pixel_accuracy'])}")
    lines.append(
        f"{result['num_images']} images, {result['images_per_second']:.2f} images/s "
        f"({result['model']})"
    )
    return "\n".join(lines)


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
