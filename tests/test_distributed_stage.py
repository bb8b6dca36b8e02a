"""A training stage under ``torchrun --nproc_per_node 2`` (Gloo on CPU)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from onepass_ovs import Segmenter

_spec = importlib.util.spec_from_file_location(
    "_stage_helpers", Path(__file__).with_name("_stage_helpers.py")
)
helpers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(helpers)


@pytest.mark.slow
def test_two_process_deop_stage_writes_one_loadable_model(tmp_path):
    data = helpers.write_rectangles(tmp_path / "data", n=6)
    start = tmp_path / "start"
    Segmenter.from_config("deop-tiny", device="cpu", seed=0).save_pretrained(start)
    output = tmp_path / "out"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "onepass_ovs.training.cli", "deop", "--data", str(data), "--model", str(start),
        "--output", str(output), "--steps", "3", "--batch-size", "2", "--unseen", "yellow box",
        "--workers", "0", "--device", "cpu", "--log-every", "1", "--no-progress",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.count("saved the trained model") == 1  # rank 0 alone reports

    trained = Segmenter.from_pretrained(output, device="cpu")
    before = Segmenter.from_pretrained(start, device="cpu").model.state_dict()
    after = trained.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(
        k.startswith(("anchors.", "clip_visual.learned_pos.", "void_embedding")) for k in changed
    )
    log = [json.loads(line) for line in (output / "training" / "train_log.jsonl").open()]
    assert [entry["step"] for entry in log] == [1, 2, 3]
    state = json.loads(
        (output / "training" / "checkpoints" / "step_00000003" / "trainer_state.json").read_text()
    )
    assert state["world_size"] == 2


@pytest.mark.slow
def test_two_process_sed_stage_writes_one_loadable_model(tmp_path):
    data = helpers.write_rectangles(tmp_path / "data", n=6)
    output = tmp_path / "out"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "onepass_ovs.training.cli", "sed", "--data", str(data), "--model", "sed-tiny",
        "--output", str(output), "--steps", "3", "--batch-size", "2", "--unseen", "yellow box",
        "--workers", "0", "--device", "cpu", "--log-every", "1", "--no-progress",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.count("saved the trained model") == 1  # rank 0 alone reports

    trained = Segmenter.from_pretrained(output, device="cpu")
    before = Segmenter.from_config("sed-tiny", device="cpu", seed=0).model.state_dict()
    after = trained.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(k.startswith("decoder.") for k in changed)
    assert changed and all(k.startswith(("decoder.", "clip_visual.")) for k in changed)
    log = [json.loads(line) for line in (output / "training" / "train_log.jsonl").open()]
    assert [entry["step"] for entry in log] == [1, 2, 3]
    state = json.loads(
        (output / "training" / "checkpoints" / "step_00000003" / "trainer_state.json").read_text()
    )
    assert state["world_size"] == 2
