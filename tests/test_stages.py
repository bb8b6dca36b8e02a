"""DeOP's training stages from Python: learning, frozen parts, resume, evaluation.

Everything runs on CPU with the ``deop-tiny`` preset and 64 x 64 synthetic images of
coloured rectangles (``_stage_helpers.write_rectangles``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import _stage_helpers as helpers
from onepass_ovs import Segmenter
from onepass_ovs.data import DatasetError, FolderDataset
from onepass_ovs.evaluation import evaluate
from onepass_ovs.training.augment import SegmentationAugment
from onepass_ovs.training.stages import (
    STAGE_DEFAULTS,
    default_config,
    train_deop,
    train_prompt,
    train_proposals,
)

one_thread = helpers.one_thread  # autouse: one torch thread per test


data_root = helpers.rectangles_fixture(n=16)


def quick_config(stage: str, output_dir, **overrides):
    values = dict(
        steps=3, batch_size=2, lr=1e-2, num_workers=0, log_every=1, progress_bar=False,
        checkpoint_every=0, output_dir=str(output_dir),
    )  # fmt: skip
    values.update(overrides)
    return default_config(stage, **values)


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def changed_keys(before: dict, after: dict) -> set[str]:
    return {k for k in before if not torch.equal(before[k], after[k])}


def under(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def read_log(output_dir) -> list[dict]:
    path = Path(output_dir) / "training" / "train_log.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


# --------------------------------------------------------------------------- learning


@pytest.mark.slow
def test_tiny_model_fits_a_tiny_dataset(data_root, tmp_path):
    """Proposals (stage 2) then DeOP heads (stage 3) on 16 images: loss falls, mIoU rises.

    ~35 s on one CPU thread: 350 proposal steps and 200 deop steps at batch 4.

    The tiny preset's CLIP is random, so its text embeddings of the five class names are
    nearly parallel (cosine ~0.9): the frozen-CLIP recipe has nothing to align with. The
    deop stage therefore also trains the CLIP image tower (clip_lr_mult=1). The proposal
    generator starts from scratch, so it gets a 100x paper lr, no backbone lr cut, no
    grad clip, and crops without rescaling (this is fitting, not generalising).
    """
    dataset = FolderDataset(data_root)
    segmenter = Segmenter.from_config("deop-tiny", device="cpu", seed=0)
    miou_before = evaluate(segmenter, dataset, progress=False)["miou"]
    flip_only = SegmentationAugment(64, short_side=(64, 64))

    segmenter = train_proposals(
        segmenter, dataset,
        quick_config("proposals", tmp_path / "proposals", steps=350, batch_size=4, lr=1e-2,
                     warmup_steps=20, grad_clip_norm=None, log_every=25,
                     lr_multipliers={"proposals.backbone": 1.0}),
        augment=flip_only,
    )  # fmt: skip
    segmenter = train_deop(
        segmenter, dataset,
        quick_config("deop", tmp_path / "deop", steps=200, batch_size=4, lr=3e-3,
                     grad_clip_norm=None, log_every=25),
        augment=flip_only, clip_lr_mult=1.0,
    )  # fmt: skip
    result = evaluate(segmenter, dataset, progress=False)

    proposal_loss = [e["loss"] for e in read_log(tmp_path / "proposals")]
    deop_loss = [e["loss"] for e in read_log(tmp_path / "deop")]
    print(
        f"\nproposals loss {proposal_loss[0]:.3f} -> {proposal_loss[-1]:.3f}; "
        f"deop loss {deop_loss[0]:.3f} -> {deop_loss[-1]:.3f}; "
        f"mIoU {miou_before:.1f} -> {result['miou']:.1f}; per class "
        + ", ".join(f"{k} {v:.0f}" for k, v in result["per_class"].items())
    )
    assert proposal_loss[-1] < 0.6 * proposal_loss[0]
    assert deop_loss[-1] < 0.75 * deop_loss[0]
    # 5 classes: the untrained model scores 8-14 (seeds 0-2), "all background" ~13; after
    # training seeds 0-2 reach 54 / 38 / 41 (blue and yellow are the hard pair: their
    # random text embeddings have cosine 0.99)
    assert result["miou"] > 30 and result["miou"] > 2.5 * miou_before


# --------------------------------------------------------------------------- each stage


@pytest.fixture(scope="module")
def proposals_model(data_root, tmp_path_factory):
    """A tiny model after a few proposal steps (the deop stage's starting point)."""
    out = tmp_path_factory.mktemp("proposals")
    dataset = FolderDataset(data_root, unseen=["yellow box"])
    segmenter = Segmenter.from_config("deop-tiny", device="cpu", seed=1)
    train_proposals(segmenter, dataset, quick_config("proposals", out))
    return out


def test_prompt_stage_adds_and_trains_only_the_context(data_root, tmp_path):
    dataset = FolderDataset(data_root, unseen=["yellow box"])
    segmenter = Segmenter.from_config("deop-tiny", device="cpu", seed=0)
    assert segmenter.config.text.prompt_length == 0
    before = snapshot(segmenter.model)

    trained = train_prompt(segmenter, dataset, quick_config("prompt", tmp_path, optimizer="sgd"))

    config = trained.config
    assert config.text.prompt_length == 4  # a quarter of the tiny text context (16)
    assert config.text.templates == ["{}."]
    after = snapshot(trained.model)
    assert set(after) - set(before) == {"text.prompt_context"}
    assert not changed_keys(before, {k: after[k] for k in before})  # all else bit-identical
    loaded = Segmenter.from_pretrained(tmp_path, device="cpu")
    assert loaded.config.text.prompt_length == 4
    for key, value in snapshot(loaded.model).items():
        assert torch.equal(value, after[key]), key
    stage = json.loads((tmp_path / "training" / "stage.json").read_text())
    assert stage["stage"] == "prompt" and stage["unseen"] == ["yellow box"]
    assert "yellow box" not in stage["classes"]
    log = read_log(tmp_path)
    assert [e["step"] for e in log] == [1, 2, 3] and {"loss", "accuracy", "lr"} <= set(log[0])

    # again, with the context in place: only the context changes
    again = train_prompt(trained, dataset, quick_config("prompt", tmp_path / "again"))
    assert changed_keys(after, snapshot(again.model)) == {"text.prompt_context"}


def test_proposal_stage_trains_only_the_proposals(data_root, tmp_path):
    dataset = FolderDataset(data_root, unseen=["yellow box"])
    segmenter = Segmenter.from_config("deop-tiny", device="cpu", seed=0)
    before = snapshot(segmenter.model)
    trained = train_proposals(segmenter, dataset, quick_config("proposals", tmp_path))
    changed = changed_keys(before, snapshot(trained.model))
    assert changed and all(k.startswith("proposals.") for k in changed)
    assert "proposals.query_embed.weight" in changed
    assert all(p.requires_grad for p in trained.model.parameters())  # flags restored
    loaded = Segmenter.from_pretrained(tmp_path, device="cpu")
    assert not changed_keys(snapshot(trained.model), snapshot(loaded.model))
    log = read_log(tmp_path)
    assert {"loss_ce", "loss_focal", "loss_dice", "loss_ce_0", "grad_norm"} <= set(log[-1])


def test_deop_stage_trains_only_the_heads_and_keeps_batchnorm_statistics(
    data_root, proposals_model, tmp_path
):
    dataset = FolderDataset(data_root, unseen=["yellow box"])
    segmenter = Segmenter.from_pretrained(proposals_model, device="cpu")
    before = snapshot(segmenter.model)
    assert any("running_mean" in k for k in before if k.startswith("proposals.backbone"))

    trained = train_deop(segmenter, dataset, quick_config("deop", tmp_path))

    after = snapshot(trained.model)
    changed = changed_keys(before, after)
    heads = ("anchors", "clip_visual.learned_pos", "void_embedding")
    assert changed and all(under(k, heads) for k in changed), changed - {
        k for k in changed if under(k, heads)
    }
    assert "void_embedding" in changed and "clip_visual.learned_pos.0" in changed
    # frozen proposal generator: weights AND BatchNorm running statistics untouched
    for key in before:
        if key.startswith("proposals."):
            assert torch.equal(before[key], after[key]), key
    loaded = Segmenter.from_pretrained(tmp_path, device="cpu")
    assert not changed_keys(after, snapshot(loaded.model))
    assert not trained.model.training  # handed back in eval mode


def test_deop_stage_options_unfreeze_clip_and_prompt(data_root, proposals_model, tmp_path):
    dataset = FolderDataset(data_root, unseen=["yellow box"])
    segmenter = Segmenter.from_pretrained(proposals_model, device="cpu")
    with pytest.raises(ValueError, match="prompt stage first"):
        train_deop(segmenter, dataset, quick_config("deop", tmp_path / "x"), train_prompt=True)
    segmenter = train_prompt(segmenter, dataset, quick_config("prompt", tmp_path / "prompt"))
    before = snapshot(segmenter.model)
    trained = train_deop(
        segmenter, dataset, quick_config("deop", tmp_path / "deop"),
        train_prompt=True, clip_lr_mult=0.5,
    )  # fmt: skip
    changed = changed_keys(before, snapshot(trained.model))
    assert {"text.prompt_context", "clip_visual.conv1.weight"} <= changed
    assert not any(k.startswith(("proposals.", "text.transformer")) for k in changed)
    state = json.loads(
        next((tmp_path / "deop" / "training" / "checkpoints").iterdir())
        .joinpath("trainer_state.json")
        .read_text()
    )
    multipliers = {
        name: group["lr_multiplier"]
        for group in state["optimizer"]["param_groups"]
        for name in group["param_names"]
    }
    assert multipliers["clip_visual.conv1.weight"] == 0.5
    assert multipliers["clip_visual.learned_pos.0"] == 1.0
    assert multipliers["anchors.query_pos.weight"] == 1.0


@pytest.mark.parametrize("stage", ["prompt", "proposals", "deop"])
def test_stages_run_under_bf16_autocast(data_root, tmp_path, stage):
    dataset = FolderDataset(data_root, unseen=["yellow box"])
    segmenter = Segmenter.from_config("deop-tiny", device="cpu", seed=0)
    train = {"prompt": train_prompt, "proposals": train_proposals, "deop": train_deop}[stage]
    trained = train(segmenter, dataset, quick_config(stage, tmp_path, steps=1, amp="bf16"))
    assert all(p.dtype == torch.float32 for p in trained.model.parameters())
    assert math.isfinite(read_log(tmp_path)[-1]["loss"])


def test_stage_defaults_are_the_papers():
    prompt, proposals, deop = (default_config(s) for s in ("prompt", "proposals", "deop"))
    assert (prompt.optimizer, prompt.lr, prompt.weight_decay, prompt.lr_schedule) == (
        "sgd", 0.02, 5e-4, "cosine"
    )  # fmt: skip
    assert (proposals.lr, proposals.weight_decay, proposals.grad_clip_norm) == (1e-4, 1e-4, 0.01)
    assert proposals.lr_multipliers == {"proposals.backbone": 0.1}
    assert (deop.lr, deop.weight_decay, deop.lr_schedule, deop.poly_power) == (
        2e-4, 1e-4, "poly", 0.9
    )  # fmt: skip
    assert deop.grad_clip_norm == 0.01 and deop.optimizer == "adamw"
    merged = default_config("proposals", lr_multipliers={"proposals.pixel_decoder": 0.5})
    assert merged.lr_multipliers == {"proposals.backbone": 0.1, "proposals.pixel_decoder": 0.5}
    assert set(STAGE_DEFAULTS) == {"prompt", "proposals", "deop", "sed", "gkc"}
    sed = default_config("sed")
    assert (sed.optimizer, sed.lr, sed.weight_decay, sed.lr_schedule, sed.grad_clip_norm) == (
        "adamw", 2e-4, 1e-4, "cosine", 0.01
    )  # fmt: skip
    assert (sed.steps, sed.batch_size, sed.lr_multipliers) == (80_000, 4, {"clip_visual": 0.01})
    with pytest.raises(ValueError, match="unknown stage"):
        default_config("maskclip")


def test_stage_input_errors(data_root, tmp_path):
    segmenter = Segmenter.from_config("deop-tiny", device="cpu", seed=0)
    with pytest.raises(DatasetError, match="not in the class list"):
        FolderDataset(data_root, unseen=["purple box"])
    dataset = FolderDataset(data_root, transform=lambda sample, generator: sample)
    with pytest.raises(ValueError, match="transform"):
        train_deop(segmenter, dataset, quick_config("deop", tmp_path))
    dataset = FolderDataset(data_root)
    with pytest.raises(ValueError, match="multiple of 32"):
        train_deop(segmenter, dataset, quick_config("deop", tmp_path), crop_size=48)
    with pytest.raises(ValueError, match="exceeds the text context of 16 tokens"):
        train_prompt(segmenter, dataset, quick_config("prompt", tmp_path), prompt_length=14)
    with pytest.raises(TypeError, match="Segmenter"):
        train_deop(segmenter.model, dataset, quick_config("deop", tmp_path))
    # a finished run is not overwritten silently
    train_deop(segmenter, dataset, quick_config("deop", tmp_path, steps=1))
    with pytest.raises(FileExistsError, match="resume"):
        train_deop(segmenter, dataset, quick_config("deop", tmp_path, steps=1))


# --------------------------------------------------------------------------- resume


def test_interrupted_deop_stage_resumes_to_the_uninterrupted_result(
    data_root, proposals_model, tmp_path, monkeypatch
):
    from onepass_ovs.training.stages import _common

    dataset = FolderDataset(data_root, unseen=["yellow box"])

    def config(name):
        return quick_config("deop", tmp_path / name, steps=4, checkpoint_every=2)

    def fresh():
        return Segmenter.from_pretrained(proposals_model, device="cpu")

    helpers.train_full_and_interrupted(
        monkeypatch, _common, train_deop, fresh, dataset, config, tmp_path
    )
    train_deop(fresh(), dataset, config("resumed"), resume="auto")

    full = load_file(tmp_path / "full" / "model.safetensors")
    resumed = load_file(tmp_path / "resumed" / "model.safetensors")
    assert all(torch.equal(full[k], resumed[k]) for k in full)
    assert [e["loss"] for e in read_log(tmp_path / "resumed")] == [
        e["loss"] for e in read_log(tmp_path / "full")
    ]


# --------------------------------------------------------------------------- evaluation


class _Result:
    def __init__(self, label_map):
        self.label_map = label_map


def test_evaluate_reports_percent_metrics_in_vocabulary_order(data_root):
    dataset = FolderDataset(data_root)

    class Oracle:
        """Returns the ground truth of each image in turn; class 4 predicted as 0."""

        def __init__(self):
            self.calls = []
            self.next_index = 0

        def segment(self, images, vocabulary, *, batch_size, progress):
            self.calls.append((len(images), list(vocabulary)))
            results = []
            for _ in images:
                label = dataset.load(self.next_index)[1].numpy()
                self.next_index += 1
                results.append(_Result(np.where(label == 4, 0, label).astype(np.int32)))
            return results

    oracle = Oracle()
    result = evaluate(oracle, dataset, unseen=["Yellow Box"], batch_size=3, progress=False)
    assert oracle.calls[0] == (3, helpers.CLASSES) and sum(n for n, _ in oracle.calls) == 16
    assert list(result["per_class"]) == helpers.CLASSES
    assert result["per_class"]["yellow box"] == 0.0
    assert result["per_class"]["red box"] == 100.0
    assert result["miou_seen"] < 100 and result["miou_unseen"] == 0.0 and result["hiou"] == 0.0
    assert result["unseen"] == ["yellow box"]
    assert 0 < result["pixel_accuracy"] < 100 and result["num_images"] == 16
    assert result["miou"] == pytest.approx(np.mean(list(result["per_class"].values())))

    limited = evaluate(Oracle(), dataset, limit=2, progress=False)
    assert limited["num_images"] == 2 and "hiou" not in limited
    with pytest.raises(ValueError, match="without unseen"):
        evaluate(Oracle(), FolderDataset(data_root, unseen=["red box"]), progress=False)
    with pytest.raises(DatasetError, match="not in the class list"):
        evaluate(Oracle(), dataset, unseen=["purple box"], progress=False)


def test_evaluate_a_real_segmenter_gives_finite_percentages(data_root):
    dataset = FolderDataset(data_root)
    segmenter = Segmenter.from_config("deop-tiny", device="cpu", seed=0)
    result = evaluate(segmenter, dataset, unseen=["yellow box"], limit=4, progress=False)
    for key in ("miou", "pixel_accuracy", "miou_seen", "miou_unseen", "hiou"):
        assert 0.0 <= result[key] <= 100.0, key
    assert all(math.isnan(v) or 0 <= v <= 100 for v in result["per_class"].values())
    assert result["images_per_second"] > 0
