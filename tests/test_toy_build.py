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


@pytest.mark.slow
def test_quick_gkc_recipe_trains_every_row_and_saves_a_text_only_model(tmp_path):
    import torch
    from safetensors.torch import load_file

    from onepass_ovs import Segmenter
    from onepass_ovs.toy import build_gkc
    from onepass_ovs.toy.clip import build_tiny_clip, save_open_clip_folder, tiny_clip_config

    torch.manual_seed(0)
    cfg = tiny_clip_config()
    clip = build_tiny_clip(cfg)
    clip_dir = save_open_clip_folder(clip, cfg, tmp_path / "clip")
    out = tmp_path / "gkc"
    build_gkc.main(["--output", str(out), "--clip", str(clip_dir), "--quick", "--ablations",
                    "--no-progress"])  # fmt: skip
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["models"]) == set(build_gkc.VARIANTS)
    for name, (use_synonyms, distill) in build_gkc.VARIANTS.items():
        step = summary["steps"][f"gkc_{name}"]
        assert (step["use_synonyms"], step["distill"]) == (use_synonyms, distill)
        assert step["train"]["step"] == build_gkc.QUICK["steps"]
        assert ("loss_kd" in step["train"]) == distill
        assert ("loss_syn_ce" in step["train"]) == use_synonyms
    record = json.loads((out / "work" / "gkc_gkc" / "training" / "stage.json").read_text())
    assert record["region_view"] == "in_place"
    assert record["synonyms"][1][0] == "red circle" and len(record["synonyms"][1]) > 1

    # the shipped folder: fp16, no image tower of the CLIP, the CLIP's text tower
    saved = load_file(out / "model" / "model.safetensors")
    assert not any(k.startswith(("visual.", "clip_visual.")) for k in saved)
    assert torch.equal(saved["text_encoder.token_embedding.weight"],
                       clip.token_embedding.weight.half())  # fmt: skip
    model = Segmenter.from_pretrained(out / "model", device="cpu")
    assert model.config.family == "gkc" and model.config.name == "demo-gkc"
    result = model.segment(torch.zeros(128, 128, 3, dtype=torch.uint8).numpy(), ["red circle", "background"])
    assert result.label_map.shape == (128, 128)


@pytest.mark.slow
def test_quick_sed_recipe_trains_and_evaluates_with_and_without_rejection(tmp_path):
    import copy

    import torch

    from onepass_ovs import Segmenter
    from onepass_ovs.config import ClipConfig
    from onepass_ovs.models.sed import TINY_CONVNEXT_CLIP_CFG
    from onepass_ovs.models.towers import create_clip
    from onepass_ovs.toy import build_sed
    from onepass_ovs.toy.clip import save_open_clip_folder

    torch.manual_seed(0)
    cfg = copy.deepcopy(TINY_CONVNEXT_CLIP_CFG)
    cfg["vision_cfg"]["image_size"] = 128
    clip = create_clip(ClipConfig(model_name="tiny-convnext", model_cfg=cfg))
    clip_dir = save_open_clip_folder(clip, cfg, tmp_path / "clip")
    out = tmp_path / "sed"
    build_sed.main(["--output", str(out), "--clip", str(clip_dir), "--quick", "--no-progress"])
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["models"]) == {"sed", "sed_no_rejection"}
    assert summary["steps"]["sed"]["train"]["step"] == build_sed.QUICK["steps"]
    assert summary["rejection_top_k"] == 8
    model = Segmenter.from_pretrained(out / "model", device="cpu")
    assert model.config.family == "sed" and model.config.name == "demo-sed"
    assert model.config.text.templates == build_sed.TEMPLATES
    assert model.config.family_config.rejection_top_k == 8
    from safetensors.torch import load_file

    saved = load_file(out / "model" / "model.safetensors")
    assert {t.dtype for t in saved.values() if t.is_floating_point()} == {torch.float16}


@pytest.mark.slow
def test_quick_gkc_recipe_on_a_convnext_trunk_keeps_the_text_clip(tmp_path):
    import torch
    from safetensors.torch import load_file

    from onepass_ovs.config import ClipConfig
    from onepass_ovs.models.towers import create_clip
    from onepass_ovs.toy import build_gkc
    from onepass_ovs.toy.clip import (
        build_tiny_clip,
        save_open_clip_folder,
        tiny_clip_config,
        tiny_convnext_clip_config,
    )

    torch.manual_seed(0)
    text_cfg = tiny_clip_config()
    text_clip = build_tiny_clip(text_cfg)
    text_dir = save_open_clip_folder(text_clip, text_cfg, tmp_path / "clip")
    trunk_cfg = tiny_convnext_clip_config()
    trunk_clip = create_clip(ClipConfig(model_name="tiny-convnext", model_cfg=trunk_cfg))
    with torch.no_grad():  # weights no fresh initialisation could have
        for param in trunk_clip.visual.trunk.parameters():
            param.add_(torch.randn_like(param) * 0.5)
    trunk_dir = save_open_clip_folder(trunk_clip, trunk_cfg, tmp_path / "convnext")
    out = tmp_path / "gkc"
    build_gkc.main(["--output", str(out), "--clip", str(text_dir), "--trunk-clip", str(trunk_dir),
                    "--quick", "--no-progress"])  # fmt: skip
    summary = json.loads((out / "summary.json").read_text())
    assert summary["settings"]["trunk_clip_dir"] == str(trunk_dir.resolve())
    saved = load_file(out / "model" / "model.safetensors")
    trunk = {k: v for k, v in trunk_clip.visual.trunk.state_dict().items() if not k.startswith("head.")}
    assert {k.removeprefix("backbone.") for k in saved if k.startswith("backbone.")} == set(trunk)
    # 3 steps at 0.1x the lr: the backbone is still the ConvNeXt CLIP's trunk (a fresh
    # init differs by ~0.5); the frozen text tower is exactly the ViT CLIP's
    assert max((saved[f"backbone.{k}"].float() - v).abs().max() for k, v in trunk.items()) < 0.01
    assert torch.equal(saved["text_encoder.token_embedding.weight"],
                       text_clip.token_embedding.weight.half())  # fmt: skip
