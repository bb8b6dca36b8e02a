"""Ray Data integration: Segment in map_batches gives the in-process label maps, byte for byte.

The batch-level tests call Segment directly (no Ray needed); one test runs the recipe of
examples/ray_batch.py on a local Ray instance (2 CPUs) over 50 shapes scenes of two
sizes, and checks its PNGs and Parquet rows against an in-process Segmenter run.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from onepass_ovs import Segmenter
from onepass_ovs.integrations.ray import Segment, batch_images, label_map_png
from onepass_ovs.toy import scenes

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "ray_batch.py"
VOCABULARY = list(scenes.CLASS_NAMES)


@pytest.fixture(scope="module")
def demo():
    return Segmenter.from_pretrained("demo", device="cpu")


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("ray_batch_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _scene_folder(root: Path) -> list[Path]:
    """50 scenes as PNGs: 25 at 128 px and 25 at 96 px (mixed sizes in Ray's batches)."""
    root.mkdir(parents=True, exist_ok=True)
    for size, start in ((128, 0), (96, 25)):
        batch = scenes.render_scenes(seed=11, n=25, size=size, start=start)
        for k, image in enumerate(batch.images):
            Image.fromarray(image).save(root / f"{start + k:03d}.png")
    return sorted(root.glob("*.png"))


def test_segment_batch_mixed_sizes(demo):
    images = [scenes.render_scenes(seed=2, n=1, size=s).images[0] for s in (96, 128, 96)]
    column = np.empty(3, dtype=object)  # how Ray hands over a variable-shaped column
    column[:] = images
    segment = Segment(demo, VOCABULARY, batch_size=2)
    out = segment({"image": column, "path": np.array(["a", "b", "c"])})
    assert set(out) == {"path", "label_map", "class_fractions"}  # image dropped
    expected = demo.segment(images, VOCABULARY)
    for got, ref, fractions in zip(out["label_map"], expected, out["class_fractions"], strict=True):
        assert got.dtype == ref.label_map.dtype and np.array_equal(got, ref.label_map)
        assert json.loads(fractions) == pytest.approx(ref.fractions())
    # one size -> a stacked (N, H, W) array, which Ray stores as a fixed-shape column
    same = segment({"image": np.stack([images[0], images[2]])})
    assert isinstance(same["label_map"], np.ndarray) and same["label_map"].shape == (2, 96, 96)


def test_segment_errors(demo):
    with pytest.raises(ValueError, match="duplicate"):
        Segment(demo, ["cat", "cat"])
    with pytest.raises(TypeError, match="unknown Segment options"):
        Segment(demo, ["cat"], thresold=0.5)
    with pytest.raises(KeyError, match="'image'"):
        Segment(demo, ["cat"])({"img": np.zeros((1, 8, 8, 3), np.uint8)})
    assert len(batch_images(np.zeros((2, 8, 8, 3), np.uint8))) == 2


def test_label_map_png_round_trip(tmp_path):
    labels = np.array([[0, 3, -1], [254, 1, 2]], dtype=np.int32)
    stored = np.asarray(Image.open(label_map_png(labels, tmp_path / "a" / "m.png")))
    assert stored.dtype == np.uint8 and np.array_equal(stored, np.where(labels < 0, 255, labels))
    wide = np.array([[300, -1]], dtype=np.int32)
    stored = np.asarray(Image.open(label_map_png(wide, tmp_path / "w.png")))
    assert np.array_equal(stored.astype(np.int64), [[300, 65535]])
    assert not list(tmp_path.rglob("*.partial"))


def test_pending_images_resume(example, tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    inputs = tmp_path / "in"
    (inputs / "sub").mkdir(parents=True)
    for name in ("a.png", "b.jpg", "sub/c.png"):
        Image.new("RGB", (4, 4)).save(inputs / name)
    (inputs / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    assert [p.name for p in example.pending_images(inputs, out)] == ["a.png", "b.jpg", "c.png"]
    (out / "fractions").mkdir(parents=True)
    pq.write_table(pa.table({"key": ["a", "sub/c"]}), out / "fractions" / "part.parquet")
    label_map_png(np.zeros((4, 4), np.int32), out / "label_maps" / "sub" / "c.png")
    # "a" is recorded but its PNG is missing -> redone; "sub/c" is done
    assert [p.name for p in example.pending_images(inputs, out)] == ["a.png", "b.jpg"]


def test_ray_recipe_matches_in_process(demo, example, tmp_path):
    ray = pytest.importorskip("ray")
    pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    paths = _scene_folder(tmp_path / "images")
    expected = demo.segment([np.asarray(Image.open(p).convert("RGB")) for p in paths], VOCABULARY)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False
        out = tmp_path / "out"
        count = example.run(tmp_path / "images", out, VOCABULARY, model="demo",
                            batch_size=10, concurrency=1)
        assert count == 50
        assert example.run(tmp_path / "images", out, VOCABULARY) == 0  # resumed: all done
    finally:
        ray.shutdown()
    table = pq.read_table(out / "fractions").to_pydict()
    assert sorted(table["key"]) == [p.stem for p in paths]
    rows = dict(zip(table["key"], table["class_fractions"], strict=True))
    for path, ref in zip(paths, expected, strict=True):
        stored = np.asarray(Image.open(out / "label_maps" / f"{path.stem}.png"))
        assert np.array_equal(stored, ref.label_map.astype(np.uint8))  # byte-identical
        assert json.loads(rows[path.stem]) == pytest.approx(ref.fractions())


def test_segment_from_onnx_folder(demo, tmp_path):
    pytest.importorskip("onnxruntime")
    from onepass_ovs.integrations.onnx import OnnxImageModel

    folder = demo.export_onnx(tmp_path / "onnx")
    segment = Segment(str(folder), VOCABULARY)
    assert isinstance(segment.segmenter.model, OnnxImageModel)
    images = scenes.render_scenes(seed=5, n=2, size=96).images
    out = segment({"image": images})
    expected = demo.segment(list(images), VOCABULARY)
    agreement = np.mean([(got == ref.label_map).mean()
                         for got, ref in zip(out["label_map"], expected, strict=True)])
    assert agreement >= 0.995
