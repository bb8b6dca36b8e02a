"""Segment a folder of images with Ray Data: label-map PNGs + class fractions in Parquet.

    pip install 'onepass-ovs[ray]'
    python examples/ray_batch.py --input images/ --output out/ \\
        --vocabulary "red circle" "blue square" background --model demo \\
        --batch-size 16 --concurrency 2 [--num-gpus 1] [--address auto]

Writes, for every image ``images/<rel>.<ext>``:

- ``out/label_maps/<rel>.png``: the label map (8-bit class indices into the vocabulary
  in the given order, 255 = unknown; 16-bit for 255 classes or more);
- one row in the Parquet files under ``out/fractions/``: ``key`` (``<rel>``), ``path``,
  ``height``, ``width``, ``class_fractions`` (JSON ``{"class": fraction}``);
- ``out/vocabulary.json``: the vocabulary, so the PNG indices can be read back.

Resumable: an image counts as done when its key is in the Parquet files AND its PNG
exists; a rerun reads only the others (PNGs are written atomically, and a PNG whose row
never reached Parquet is simply rewritten). Rerun with the same vocabulary (checked).
See docs/ray.md.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


def image_key(path: Path, input_dir: Path) -> str:
    """``<rel>``: the image's path relative to the input folder, without its suffix."""
    return path.relative_to(input_dir).with_suffix("").as_posix()


def done_keys(output_dir: Path) -> set[str]:
    """Keys recorded in the Parquet files whose label-map PNG exists."""
    fractions = output_dir / "fractions"
    if not fractions.is_dir() or not any(fractions.glob("*.parquet")):
        return set()
    import pyarrow.parquet as pq

    keys = pq.read_table(fractions, columns=["key"]).column("key").to_pylist()
    return {k for k in keys if (output_dir / "label_maps" / f"{k}.png").is_file()}


def pending_images(input_dir: Path, output_dir: Path) -> list[Path]:
    """Image files under ``input_dir`` (sorted) that are not done yet."""
    input_dir = Path(input_dir).resolve()
    done = done_keys(Path(output_dir))
    files = sorted(p for p in input_dir.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    return [p for p in files if image_key(p, input_dir) not in done]


def write_outputs(batch: dict, input_dir: str, output_dir: str) -> dict:
    """map_batches step after Segment: write each label map as a PNG and return the
    Parquet rows (key, path, height, width, class_fractions)."""
    from onepass_ovs.integrations.ray import label_map_png

    input_dir, output_dir = Path(input_dir), Path(output_dir)
    rows: dict[str, list] = {"key": [], "path": [], "height": [], "width": [], "class_fractions": []}
    for path, label_map, fractions in zip(
        batch["path"], batch["label_map"], batch["class_fractions"], strict=True
    ):
        path = Path(str(path))
        if not path.is_absolute():  # Ray drops the leading "/" of local paths
            path = Path("/") / path
        key = image_key(path, input_dir)
        label_map_png(label_map, output_dir / "label_maps" / f"{key}.png")
        rows["key"].append(key)
        rows["path"].append(str(path))
        rows["height"].append(int(label_map.shape[0]))
        rows["width"].append(int(label_map.shape[1]))
        rows["class_fractions"].append(str(fractions))
    return {name: np.array(values) for name, values in rows.items()}


def run(input_dir, output_dir, vocabulary, *, model="demo", batch_size=16, concurrency=1,
        num_gpus=0.0, segment_options=None) -> int:
    """Segment every pending image; returns how many were processed this time."""
    import ray

    from onepass_ovs.integrations.ray import Segment

    input_dir, output_dir = Path(input_dir).resolve(), Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    vocab_file = output_dir / "vocabulary.json"
    if vocab_file.is_file() and json.loads(vocab_file.read_text()) != list(vocabulary):
        raise ValueError(f"{output_dir} was written with another vocabulary ({vocab_file})")
    vocab_file.write_text(json.dumps(list(vocabulary), indent=1) + "\n")
    todo = pending_images(input_dir, output_dir)
    if not todo:
        return 0
    ds = ray.data.read_images([str(p) for p in todo], mode="RGB", include_paths=True)
    ds = ds.map_batches(
        Segment,
        fn_constructor_kwargs={"model": model, "vocabulary": list(vocabulary),
                               **(segment_options or {})},
        batch_size=batch_size,
        concurrency=concurrency,
        num_gpus=num_gpus,
    )
    ds = ds.map_batches(
        write_outputs, fn_kwargs={"input_dir": str(input_dir), "output_dir": str(output_dir)},
        batch_size=batch_size,
    )
    ds.write_parquet(str(output_dir / "fractions"))
    return len(todo)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, type=Path)
    parser.add_argument("--output", required=True, type=Path)
    parser.add_argument("--vocabulary", required=True, nargs="+")
    parser.add_argument("--model", default="demo", help="preset, hf-hub:, clip:, folder or ONNX folder")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--concurrency", type=int, default=1, help="number of model actors")
    parser.add_argument("--num-gpus", type=float, default=0.0, help="GPUs per actor")
    parser.add_argument("--address", default=None, help="Ray cluster address (default: local)")
    args = parser.parse_args()

    import ray

    ray.init(address=args.address)
    count = run(args.input, args.output, args.vocabulary, model=args.model,
                batch_size=args.batch_size, concurrency=args.concurrency, num_gpus=args.num_gpus)
    print(f"segmented {count} images; all done: {len(pending_images(args.input, args.output)) == 0}")


if __name__ == "__main__":
    main()
