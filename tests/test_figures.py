"""docs/figures/make_figures.py: runs, writes valid PNGs, and draws what it claims."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "docs" / "figures" / "make_figures.py"
FIGURES = ("shapes_scenes", "severance", "cal_heatmaps", "sliding_windows", "shapes_table")


def _load_script():
    spec = importlib.util.spec_from_file_location("make_figures", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def figures():
    return _load_script()


@pytest.fixture(scope="module")
def demo():
    from onepass_ovs import Segmenter

    return Segmenter.from_pretrained("demo", device="cpu")


@pytest.fixture(scope="module")
def drawn(tmp_path_factory):
    """Run the script as the docs say, into a tmp folder, with a custom shapes table."""
    out = tmp_path_factory.mktemp("figures")
    table = out / "table.json"
    table.write_text(json.dumps({"rows": [
        {"model": "a", "seen": 80.0, "unseen": 40.0, "hiou": 53.3},
        {"model": "b", "seen": 10.0, "unseen": 5.0, "hiou": 6.7},
    ]}))
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(out / "png"), "--quick", "--shapes-json", str(table)],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out / "png"


def test_script_writes_valid_small_pngs(drawn):
    from PIL import Image

    for name in FIGURES:
        path = drawn / f"{name}.png"
        assert path.is_file(), name
        assert path.stat().st_size < 300_000, name
        with Image.open(path) as image:
            assert image.format == "PNG"
            image.verify()
        with Image.open(path) as image:
            width, height = image.size
            assert 300 <= width <= 2000 and 200 <= height <= 2000, (name, image.size)
            pixels = np.asarray(image.convert("RGB"))
            assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 20, f"{name} is nearly blank"


def test_severance_panels_differ_in_the_png(drawn, figures):
    from PIL import Image

    side = figures.SEVERANCE_SIDE
    boxes, _ = figures.row_boxes([(side, side)] * (1 + len(figures.SEVERANCE_VARIANTS)), heading=True)
    pixels = np.asarray(Image.open(drawn / "severance.png").convert("RGB")).astype(int)
    panels = [pixels[y0:y1, x0:x1] for x0, y0, x1, y1 in boxes]
    plain = panels[1]  # severance "none"
    for variant, panel in zip(figures.SEVERANCE_VARIANTS[1:], panels[2:], strict=True):
        changed = np.abs(panel - plain).sum(-1) > 0
        assert changed.mean() > 0.05, f"{variant} map looks like the unsevered one"


def test_severance_maps_match_the_model(figures, demo):
    """The rebuilt variants carry the demo's weights: the demo's own variant and "none"
    equal what the demo's tower computes, and every variant changes the map."""
    from onepass_ovs.models.preprocessing import normalise

    scene = figures._demo_scene()
    name = scene.objects[0].class_name
    maps = figures.severance_maps(demo, scene.image, name)
    assert set(maps) == set(figures.SEVERANCE_VARIANTS)

    model = demo.model
    pre = model.config.preprocess
    images = torch.from_numpy(scene.image).permute(2, 0, 1).float().div(255)[None]
    text = demo.encode_text([name]).float()[0]
    tower = model.clip_visual
    shipped = tower.severance
    with torch.no_grad():
        mask_logits = model.encode_image(images)["mask_logits"]
        clip_in = normalise(images, pre.clip_mean, pre.clip_std, None)
        reference = {}
        for variant in (shipped, "none"):
            tower.severance = variant
            try:
                dense, grid = tower(clip_in, mask_logits)
            finally:
                tower.severance = shipped
            reference[variant] = (dense[0] @ text).reshape(grid).numpy()
    for variant, values in reference.items():
        np.testing.assert_allclose(maps[variant], values, atol=1e-5)
    for variant in figures.SEVERANCE_VARIANTS[1:]:
        assert np.abs(maps[variant] - maps["none"]).max() > 1e-3, variant


def test_cal_heatmaps_reproduce_the_pooled_embeddings(figures, demo):
    """Per-head heatmaps times the CLIP values give back CAL's own pooled output."""
    cal = figures.cal_heatmaps(demo, figures._demo_scene().image)
    heads, n, _ = cal["head_heatmaps"].shape
    pooled = torch.from_numpy(cal["head_heatmaps"]) @ torch.from_numpy(cal["values"])  # (heads, N, d)
    pooled = F.normalize(pooled.transpose(0, 1).flatten(1), dim=-1)
    np.testing.assert_allclose(pooled.numpy(), cal["pooled"], atol=1e-4)
    assert cal["heatmaps"].shape[0] == n == cal["masks"].shape[0] == cal["logits"].shape[0]
    np.testing.assert_allclose(
        cal["heatmaps"].reshape(n, -1), cal["head_heatmaps"].mean(0), rtol=1e-6, atol=1e-9
    )


def test_shapes_table_rejects_bad_rows(figures, tmp_path):
    with pytest.raises(ValueError, match="lacks"):
        figures.shapes_table_figure({"rows": [{"model": "x", "seen": 1.0}]}, tmp_path)
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    with pytest.raises(ValueError, match="rows"):
        figures.load_shapes_table(str(bad))
