"""The shapes-world recipe end to end in ``--quick`` mode: every step runs, every row is
evaluated, and the summary records each step's time and metrics."""

from __future__ import annotations

import json

import pytest

from onepass_ovs.toy import build


@pytest.mark.slow
def test_quick_recipe_runs_end_to_end_with_all_rows(tmp_path):
    out = tmp_path / "quick"
    build.main(["--output", str(out), "--quick", "--ablations", "--no-progress"])
    summary = json.loads((out / "summary.json").read_text())
    steps = summary["steps"]
    expected_steps = {
        "clip", "train_scenes", "proposals", "write",
        *(f"deop_{name}" for name in (
            "deop", "no_severance", "severance_identity", "severance_mask_guided",
            "mask_average", "clip_finetuned",
        )),
    }
    assert set(steps) == expected_steps
    assert all(step["seconds"] >= 0 for step in steps.values())
    assert steps["clip"]["conv_stem"] == [32, 64, 128]
    assert set(steps["clip"]["metrics"]) == {
        f"{kind}_{split}" for kind in ("zero_shot", "region", "region_severed")
        for split in ("seen", "unseen")
    }
    assert steps["deop_deop"]["clip_lr_mult"] == 0.0  # frozen, as the paper
    assert steps["deop_clip_finetuned"]["clip_lr_mult"] == 0.1
    assert steps["deop_no_severance"]["changes"] == {"clip.severance": "none"}
    assert steps["proposals"]["train"]["step"] == build.QUICK["proposal_steps"]
    assert steps["deop_deop"]["train"]["step"] == build.QUICK["deop_steps"]
    assert steps["clip"]["train"]["step"] == build.QUICK["clip_steps"]
    rows = summary["models"]
    assert set(rows) == {
        "deop", "no_severance", "severance_identity", "severance_mask_guided", "mask_average",
        "clip_finetuned", "two_stream", "training_free_clearclip", "training_free_none",
    }
    for row in rows.values():
        assert {"miou_seen", "miou_unseen", "hiou", "images_per_second", "eval_seconds"} <= set(row)
    assert summary["total_seconds"] > 0
    # the shipped folders: the main model and one per ablation, loadable
    from onepass_ovs import Segmenter

    model = Segmenter.from_pretrained(out / "model", device="cpu")
    assert model.config.clip.conv_stem == (32, 64, 128)
    assert model.config.clip.severance == "weighted"
    ablation = Segmenter.from_pretrained(out / "ablations" / "severance_mask_guided", device="cpu")
    assert ablation.config.clip.severance == "mask-guided"
