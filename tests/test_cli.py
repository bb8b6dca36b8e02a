"""ovs-segment on files and folders."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image
from typer.testing import CliRunner

from onepass_ovs.cli import segment_app

runner = CliRunner()


def _images(folder, n, rng):
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = folder / f"img{i}.png"
        Image.fromarray((rng.random((40 + i, 50, 3)) * 255).astype(np.uint8)).save(path)
        paths.append(path)
    return paths


def test_cli_on_a_file_with_json_and_overlay(tiny_saved, tmp_path, rng):
    (path,) = _images(tmp_path / "in", 1, rng)
    out = tmp_path / "out"
    result = runner.invoke(
        segment_app,
        [str(path), "--classes", "cat", "sofa", "--model", str(tiny_saved),
         "--output-dir", str(out), "--overlay", "--json"],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["image"] == str(path)
    assert abs(sum(report["classes"].values()) - 1.0) < 1e-6
    assert set(report["classes"]) <= {"cat", "sofa"}
    labels = Image.open(out / "img0_labels.png")
    assert labels.mode == "P" and labels.size == (50, 40)
    assert Image.open(out / "img0_overlay.jpg").size == (50, 40)


def test_cli_on_a_folder(tiny_saved, tmp_path, rng):
    _images(tmp_path / "in", 3, rng)
    out = tmp_path / "out"
    result = runner.invoke(
        segment_app,
        [str(tmp_path / "in"), "--classes", "cat", "--classes", "dog", "--model", str(tiny_saved),
         "-o", str(out), "--batch-size", "2"],
    )
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == [f"img{i}_labels.png" for i in range(3)]
    assert result.stdout.count("_labels.png") == 3


def test_cli_missing_model_and_missing_image(tmp_path, rng):
    (path,) = _images(tmp_path, 1, rng)
    result = runner.invoke(segment_app, [str(path), "--classes", "cat", "--model", str(tmp_path / "nomodel")])
    assert result.exit_code == 2
    assert "nomodel" in result.output and "--model demo" in result.output
    result = runner.invoke(segment_app, [str(tmp_path / "missing.png"), "--classes", "cat"])
    assert result.exit_code == 2 and "missing.png" in result.output
