"""ovs-segment on files and folders: the installed command, run as a user would."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from typer.testing import CliRunner

from onepass_ovs.cli import segment_app

runner = CliRunner()
SRC = Path(__file__).resolve().parents[1] / "src"


def _command(name: str) -> list[str]:
    """The installed console script, or the same entry point through this Python."""
    exe = shutil.which(name)
    if exe is not None:
        return [exe]
    module, attr = {
        "ovs-segment": ("onepass_ovs.cli", "segment_app"),
        "ovs-train": ("onepass_ovs.training.cli", "app"),
    }[name]
    return [sys.executable, "-c", f"import sys; from {module} import {attr} as a; sys.argv[0] = {name!r}; a()"]


def cli(*args, cwd: Path, env: dict | None = None, name: str = "ovs-segment", timeout: float = 300):
    """Run the command; returns CompletedProcess with text stdout / stderr."""
    environment = dict(os.environ)
    environment.update(
        PYTHONPATH=os.pathsep.join([str(SRC), environment.get("PYTHONPATH", "")]),
        OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE",
    )
    environment.pop("ONEPASS_OVS_TRACEBACK", None)
    environment.update(env or {})
    return subprocess.run(
        _command(name) + [str(a) for a in args], cwd=cwd, env=environment,
        capture_output=True, text=True, timeout=timeout,
    )


def _images(folder: Path, n: int, rng, start: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(start, start + n):
        path = folder / f"img{i}.png"
        Image.fromarray((rng.random((40 + i, 50, 3)) * 255).astype(np.uint8)).save(path)
        paths.append(path)
    return paths


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip()]


# -- in-process: argument expansion and output names ---------------------------------------


def test_classes_take_several_values():
    from onepass_ovs.cli import expand_multi_value

    assert expand_multi_value(["a.png", "--classes", "cat", "dog", "tv, television", "-o", "x"]) == [
        "a.png", "--classes", "cat", "--classes", "dog", "--classes", "tv, television", "-o", "x"
    ]
    assert expand_multi_value(["-c", "cat", "--", "b.png"]) == ["-c", "cat", "--", "b.png"]
    assert expand_multi_value(["--classes=cat", "b.png"]) == ["--classes=cat", "b.png"]
    assert expand_multi_value(["--model", "-c", "--classes"]) == ["--model", "-c", "--classes"]


def test_output_names_are_distinct(tmp_path):
    from onepass_ovs.cli import output_names

    paths = [
        tmp_path / "a" / "x.png", tmp_path / "b" / "x.png", tmp_path / "a" / "x.jpg",
        tmp_path / "b" / "y.png", tmp_path / "a" / "X.png",
    ]
    names = output_names(paths)
    assert len({n.lower() for n in names}) == len(paths)
    assert names[3] == "y"  # unique stems stay as they are
    assert names[1] == "b__x"


def test_cli_on_a_file_with_json_and_overlay(tiny_saved, tmp_path, rng):
    (path,) = _images(tmp_path / "in", 1, rng)
    out = tmp_path / "out"
    result = runner.invoke(
        segment_app,
        [str(path), "--classes", "cat", "sofa", "--model", str(tiny_saved),
         "--output-dir", str(out), "--overlay", "--json"],
    )
    assert result.exit_code == 0, result.output
    (report,) = json.loads(result.stdout)  # always a list, one object per image
    assert report["image"] == str(path)
    assert abs(sum(report["classes"].values()) - 1.0) < 1e-6
    assert set(report["classes"]) <= {"cat", "sofa"}
    labels = Image.open(out / "img0_labels.png")
    assert labels.mode == "P" and labels.size == (50, 40)
    overlay = Image.open(out / "img0_overlay.jpg")
    assert overlay.size[0] > 50 and overlay.size[1] >= 40  # the image plus its legend


def test_cli_missing_model_and_missing_image(tmp_path, rng):
    (path,) = _images(tmp_path, 1, rng)
    result = runner.invoke(segment_app, [str(path), "--classes", "cat", "--model", str(tmp_path / "nomodel")])
    assert result.exit_code == 2
    assert "nomodel" in result.output and "--model demo" in result.output
    result = runner.invoke(segment_app, [str(tmp_path / "missing.png"), "--classes", "cat"])
    assert result.exit_code == 2 and "missing.png" in result.output


# -- the installed command ------------------------------------------------------------------


def test_arguments_are_inputs_never_class_names(tiny_saved, tmp_path, rng):
    (image,) = _images(tmp_path, 1, rng)
    out = tmp_path / "out"
    # a mistyped image path is an error naming it, not a class
    run = cli("photo", "--classes", "cat", "dog", "--model", tiny_saved, "-o", out, cwd=tmp_path)
    assert run.returncode == 2 and "'photo'" in run.stderr
    assert not out.exists()
    # flags take no value: "true" is an input, and there is no such file
    run = cli(image, "--overlay", "true", "--classes", "cat", "--model", tiny_saved, "-o", out, cwd=tmp_path)
    assert run.returncode == 2 and "'true'" in run.stderr and not out.exists()
    # an empty class name is an error, not "the current folder"
    run = cli(image, "--classes", "cat", "", "--model", tiny_saved, "-o", out, cwd=tmp_path)
    assert run.returncode == 2 and "empty" in run.stderr and not out.exists()
    assert len(_error_lines(run.stderr)) == 1
    # a class named like an existing folder stays a class
    _images(tmp_path / "good", 2, rng, start=5)
    run = cli(image, "--classes", "cat", "good", "--model", tiny_saved, "-o", out, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert sorted(p.name for p in out.iterdir()) == ["classes.json", "img0_labels.png"]
    assert json.loads((out / "classes.json").read_text()) == {"0": "cat", "1": "good", "255": "unknown"}


def test_folder_run_skips_a_bad_file_and_keeps_its_batch(tiny_saved, tmp_path, rng):
    images = _images(tmp_path / "in", 3, rng)
    (tmp_path / "in" / "img1b.png").write_text("not an image")  # sorts into the first batch
    other = _images(tmp_path / "more", 1, rng)  # same stem as in/img0.png
    out = tmp_path / "out"
    run = cli(
        "in", "more", "--classes", "cat", "dog", "tv, television", "--model", tiny_saved,
        "-o", out, "--json", cwd=tmp_path,
    )
    assert run.returncode == 1, run.stderr  # something failed: non-zero, at the end
    skipped = [line for line in run.stderr.splitlines() if line.startswith("skipped")]
    assert len(skipped) == 1 and "img1b.png" in skipped[0] and "not an image" in skipped[0]
    assert "segmented 4 of 5 images" in run.stderr
    report = json.loads(run.stdout)
    assert [Path(e["image"]).name for e in report] == ["img0.png", "img1.png", "img1b.png", "img2.png", "img0.png"]
    assert "error" in report[2] and "labels" not in report[2]
    written = sorted(p.name for p in out.iterdir())
    assert written == sorted(
        ["classes.json", "in__img0_labels.png", "more__img0_labels.png", "img1_labels.png", "img2_labels.png"]
    )
    for entry, source in zip([report[0], report[1], report[3], report[4]], [*images, *other], strict=True):
        assert (tmp_path / entry["image"]).resolve() == source.resolve()
        assert Image.open(tmp_path / entry["labels"]).size == Image.open(source).size
    assert json.loads((out / "classes.json").read_text()) == {
        "0": "cat", "1": "dog", "2": "tv, television", "255": "unknown"
    }


def test_json_is_a_list_whatever_the_number_of_images(tiny_saved, tmp_path, rng):
    _images(tmp_path / "one", 1, rng)
    (tmp_path / "none").mkdir()
    (tmp_path / "none" / "broken.png").write_bytes(b"\x89PNG broken")
    shapes = []
    for folder in ("one", "none"):
        run = cli(folder, "--classes", "cat", "--model", tiny_saved, "-o", tmp_path / "out", "--json", cwd=tmp_path)
        report = json.loads(run.stdout)  # zero images segmented: no crash, still a list
        shapes.append((run.returncode, len(report), sorted(report[0])))
    assert shapes == [(0, 1, ["classes", "image", "labels"]), (1, 1, ["error", "image"])]


def test_offline_without_a_model_fails_fast_and_once(tmp_path, rng):
    (image,) = _images(tmp_path, 1, rng)
    empty_cache = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_CACHE": str(tmp_path / "hf" / "hub")}
    for extra in ({"HF_HUB_OFFLINE": "1"}, {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"}):
        start = time.perf_counter()
        run = cli(image, "--classes", "cat", "-o", tmp_path / "out", cwd=tmp_path, env={**empty_cache, **extra})
        elapsed = time.perf_counter() - start
        assert run.returncode == 2
        lines = _error_lines(run.stderr)
        assert len(lines) == 1, run.stderr
        assert "ViT-B-16" in lines[0] and "--model demo" in lines[0]
        assert "are failed" not in lines[0]
        assert elapsed < 30, f"took {elapsed:.0f} s"  # no download retries (was ~35 s + imports)


def test_errors_are_one_line(tiny_saved, tmp_path, rng):
    from tests.test_bad_inputs import write_png_header

    (image,) = _images(tmp_path, 1, rng)
    bomb = write_png_header(tmp_path / "bomb.png", 100_000, 100_000)
    run = cli(image, bomb, "--classes", "cat", "--model", tiny_saved, "-o", tmp_path / "out", cwd=tmp_path)
    assert run.returncode == 1
    assert "Traceback" not in run.stderr
    (skipped,) = [line for line in run.stderr.splitlines() if "bomb.png" in line]
    assert skipped.startswith("skipped") and "too large" in skipped
    assert (tmp_path / "out" / "img0_labels.png").is_file()
    devices = ["nonsense"] + ([] if torch.cuda.is_available() else ["cuda"])
    for device in devices:
        run = cli(image, "--classes", "cat", "--model", tiny_saved, "--device", device, cwd=tmp_path)
        assert run.returncode == 2 and "Traceback" not in run.stderr
        (line,) = _error_lines(run.stderr)
        assert line.startswith("error: --device")
    # click's usage errors too (no usage block, no hint line)
    for bad in (["--batch-size", "0"], ["--bogus"]):
        run = cli(image, "--classes", "cat", "--model", tiny_saved, *bad, cwd=tmp_path)
        assert run.returncode == 2
        (line,) = _error_lines(run.stderr)
        assert line.startswith("error: ") and bad[0] in line


def test_version_and_help(tmp_path):
    import onepass_ovs

    run = cli("--version", cwd=tmp_path)
    assert run.returncode == 0 and onepass_ovs.__version__ in run.stdout
    run = cli("--help", cwd=tmp_path)
    assert run.returncode == 0 and "hf-hub:org/repo[@rev]" in run.stdout
    for args in (["--help"], ["deop", "--help"], ["prompt", "--help"]):
        run = cli(*args, cwd=tmp_path, name="ovs-train")
        assert run.returncode == 0 and "…" not in run.stdout, run.stdout
    flat = " ".join(run.stdout.split())
    assert "images/<stem>.jpg|png, masks/<stem>.png" in flat


def test_cli_waits_passively_unless_told_otherwise(tmp_path):
    """OpenMP spin-waiting makes a busy machine many times slower: the CLI sets
    OMP_WAIT_POLICY=PASSIVE before torch loads, and respects a value the user set."""
    probe = (
        "import os; os.environ.pop('OMP_WAIT_POLICY', None) if {clear} else None; "
        "import onepass_ovs.cli, torch; print(os.environ.get('OMP_WAIT_POLICY'))"
    )
    env = dict(os.environ, PYTHONPATH=str(SRC))
    env.pop("OMP_WAIT_POLICY", None)
    out = subprocess.run([sys.executable, "-c", probe.format(clear=True)], env=env,
                         capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "PASSIVE"
    env["OMP_WAIT_POLICY"] = "ACTIVE"
    out = subprocess.run([sys.executable, "-c", probe.format(clear=False)], env=env,
                         capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "ACTIVE"
