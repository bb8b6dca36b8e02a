"""A tiny synthetic segmentation dataset for the stage, CLI and evaluation tests.

``write_rectangles(root, n)`` writes the folder format (``classes.txt``, ``images/``,
``masks/``): 64 x 64 images of a noisy grey background with two or three solid
rectangles of distinct colours; the mask holds the class of every pixel.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

CLASSES = ["background", "red box", "green box", "blue box", "yellow box"]
COLOURS = {1: (220, 40, 40), 2: (40, 170, 60), 3: (40, 80, 220), 4: (230, 210, 40)}


def write_rectangles(root, n: int = 12, size: int = 64, seed: int = 0) -> Path:
    """Write ``n`` images + masks under ``root``; returns ``root``."""
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    rng = np.random.default_rng(seed)
    for index in range(n):
        grey = rng.integers(90, 150)
        image = np.clip(grey + rng.normal(0, 8, (size, size, 3)), 0, 255)
        label = np.zeros((size, size), dtype=np.uint8)
        for class_id in rng.permutation(list(COLOURS))[: rng.integers(2, 4)]:
            h, w = rng.integers(size // 4, size // 2, 2)
            top, left = rng.integers(0, size - h), rng.integers(0, size - w)
            image[top : top + h, left : left + w] = COLOURS[int(class_id)]
            label[top : top + h, left : left + w] = class_id
        Image.fromarray(image.astype(np.uint8)).save(root / "images" / f"img{index:03d}.png")
        Image.fromarray(label).save(root / "masks" / f"img{index:03d}.png")
    return root


@pytest.fixture(autouse=True)
def one_thread():
    """Run each test on one torch thread: the models are tiny, so thread hand-offs cost
    more than they save, badly so when other test processes share the cores. A test
    module opts in with ``from _stage_helpers import one_thread``."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def rectangles_fixture(n: int):
    """A module-scoped ``data_root`` fixture: ``write_rectangles`` with ``n`` images."""

    @pytest.fixture(scope="module")
    def data_root(tmp_path_factory):
        return write_rectangles(tmp_path_factory.mktemp("rectangles"), n=n)

    return data_root


FAST = ["--workers", "0", "--no-progress", "--log-every", "1"]


def train(*args):
    """``ovs-train`` through typer's runner with the quick options appended."""
    from typer.testing import CliRunner

    from onepass_ovs.training.cli import app as train_app

    return CliRunner().invoke(train_app, [str(a) for a in args] + FAST)


def ok(result):
    """Assert a CLI result exited 0 (showing its output otherwise); returns it."""
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result


def crash_at_step(monkeypatch, common_module, step: int, error: BaseException | None = None):
    """Make ``common_module.stage_loss`` raise ``error`` (default KeyboardInterrupt) on its
    ``step``-th call (1-based); returns a function that puts the real loss back."""
    real_loss, calls = common_module.stage_loss, []

    def crashing_loss(model, batch):
        calls.append(1)
        if len(calls) == step:
            raise KeyboardInterrupt if error is None else error
        return real_loss(model, batch)

    monkeypatch.setattr(common_module, "stage_loss", crashing_loss)
    return lambda: monkeypatch.setattr(common_module, "stage_loss", real_loss)


def run_torchrun_stage(stage: str, data, model, output, *extra: str):
    """Run ``ovs-train <stage>`` under ``torchrun --nproc_per_node 2`` on CPU (3 steps,
    batch 2, unseen "yellow box"); asserts it succeeded and that rank 0 alone reported."""
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "onepass_ovs.training.cli", stage, "--data", str(data), "--model", str(model),
        "--output", str(output), "--steps", "3", "--batch-size", "2", "--unseen", "yellow box",
        "--workers", "0", "--device", "cpu", "--log-every", "1", "--no-progress", *extra,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.count("saved the trained model") == 1  # rank 0 alone reports
    return result


def train_full_and_interrupted(monkeypatch, common_module, train, fresh, dataset, config, root):
    """``train(fresh(), dataset, config("full"))`` to the end, then the same run into
    ``config("resumed")`` stopped by a KeyboardInterrupt at step 3, which must leave no
    model in ``root / "resumed"`` (the caller resumes it and compares)."""
    train(fresh(), dataset, config("full"))
    restore_loss = crash_at_step(monkeypatch, common_module, 3)
    with pytest.raises(KeyboardInterrupt):
        train(fresh(), dataset, config("resumed"))
    restore_loss()
    assert not (Path(root) / "resumed" / "model.safetensors").exists()
