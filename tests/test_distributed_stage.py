"""A training stage under ``torchrun --nproc_per_node 2`` (Gloo on CPU)."""

from __future__ import annotations

import json

import pytest
import torch

import _stage_helpers as helpers
from onepass_ovs import Segmenter


@pytest.mark.slow
def test_two_process_deop_stage_writes_one_loadable_model(tmp_path):
    data = helpers.write_rectangles(tmp_path / "data", n=6)
    start = tmp_path / "start"
    Segmenter.from_config("deop-tiny", device="cpu", seed=0).save_pretrained(start)
    output = tmp_path / "out"
    helpers.run_torchrun_stage("deop", data, start, output)

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
    helpers.run_torchrun_stage("sed", data, "sed-tiny", output)

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
