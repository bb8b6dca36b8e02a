"""``ovs-train`` and ``ovs-eval`` end to end on a tiny synthetic dataset (CPU).

train (prompt -> proposals -> deop) -> evaluate (--json and table) -> ``ovs-segment``
with the trained folder; ``--resume``; and the error paths a user meets first.
"""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import _stage_helpers as helpers
from onepass_ovs import Segmenter
from onepass_ovs.cli import segment_app
from onepass_ovs.evaluation.cli import app as eval_app
from onepass_ovs.training.cli import app as train_app

_spec = importlib.util.spec_from_file_location(
    "_hub_helpers", Path(__file__).with_name("_hub_helpers.py")
)
hub_helpers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(hub_helpers)

runner = CliRunner()


one_thread = helpers.one_thread  # autouse: one torch thread per test


data_root = helpers.rectangles_fixture(n=8)


train, ok = helpers.train, helpers.ok


def test_train_eval_segment_round_trip(data_root, tmp_path):
    prompt, proposals, deop = tmp_path / "prompt", tmp_path / "proposals", tmp_path / "deop"
    ok(train("prompt", "--data", data_root, "--model", "deop-tiny", "--output", prompt,
             "--steps", 2, "--batch-size", 2, "--unseen", "yellow box"))  # fmt: skip
    assert Segmenter.from_pretrained(prompt, device="cpu").config.text.prompt_length == 4
    ok(train("proposals", "--data", data_root, "--model", prompt, "--output", proposals,
             "--steps", 2, "--batch-size", 2, "--unseen", "yellow box",
             "--crop-size", 64))  # fmt: skip
    # the exact form external checks use
    result = ok(train("deop", "--data", data_root, "--model", proposals, "--output", deop,
                      "--steps", 2, "--batch-size", 2, "--lr", "1e-3",
                      "--unseen", "yellow box"))  # fmt: skip
    assert "saved the trained model" in result.output
    trained = Segmenter.from_pretrained(deop, device="cpu")
    assert trained.config.text.prompt_length == 4  # carried through every stage
    assert sorted(p.name for p in deop.iterdir()) == [
        "config.json",
        "model.safetensors",
        "training",
    ]
    run = deop / "training"
    assert (run / "train_log.jsonl").is_file() and (run / "checkpoints" / "step_00000002").is_dir()
    assert json.loads((run / "config.json").read_text())["lr"] == 1e-3
    assert json.loads((run / "stage.json").read_text())["unseen"] == ["yellow box"]

    result = ok(runner.invoke(eval_app, ["--model", str(deop), "--data", str(data_root),
                                         "--unseen", "yellow box", "--json"]))  # fmt: skip
    report = json.loads(result.stdout)
    for key in ("miou", "miou_seen", "miou_unseen", "hiou", "pixel_accuracy"):
        assert 0.0 <= report[key] <= 100.0, key
    assert list(report["per_class"]) == helpers.CLASSES
    assert all(v is None or 0.0 <= v <= 100.0 for v in report["per_class"].values())
    assert report["num_images"] == 8

    result = ok(runner.invoke(eval_app, ["--model", str(deop), "--data", str(data_root),
                                         "--unseen", "yellow box", "--limit", "2",
                                         "--no-progress"]))  # fmt: skip
    assert "mIoU unseen" in result.stdout and "yellow box" in result.stdout
    assert "2 images" in result.stdout

    image = data_root / "images" / "img000.png"
    result = ok(runner.invoke(segment_app, [str(image), "--classes", *helpers.CLASSES,
                                            "--model", str(deop), "--output-dir",
                                            str(tmp_path / "seg"), "--json"]))  # fmt: skip
    assert set(json.loads(result.stdout)[0]["classes"]) <= set(helpers.CLASSES)  # a list
    assert (tmp_path / "seg" / "img000_labels.png").is_file()


def test_resume_continues_an_interrupted_run(data_root, tmp_path, monkeypatch):
    from onepass_ovs.training.stages import _common

    start = tmp_path / "start"
    Segmenter.from_config("deop-tiny", device="cpu", seed=3).save_pretrained(start)
    common = ["--data", data_root, "--model", start, "--steps", 4, "--batch-size", 2,
              "--checkpoint-every", 2, "--lr", "1e-3"]  # fmt: skip
    ok(train("deop", *common, "--output", tmp_path / "full"))

    restore_loss = helpers.crash_at_step(
        monkeypatch, _common, 3, RuntimeError("simulated preemption")
    )
    assert train("deop", *common, "--output", tmp_path / "cut").exit_code != 0
    restore_loss()
    result = train("deop", *common, "--output", tmp_path / "cut")
    assert result.exit_code == 2 and "resume" in result.output  # refuses to start over
    ok(train("deop", *common, "--output", tmp_path / "cut", "--resume"))

    full = load_file(tmp_path / "full" / "model.safetensors")
    resumed = load_file(tmp_path / "cut" / "model.safetensors")
    assert all(torch.equal(full[k], resumed[k]) for k in full)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--data", "{missing}"], "not found"),
        (["--data", "{empty}"], "class list not found"),
        (["--data", "{data}", "--unseen", "yellow box,purple box"], "'purple box' is not in"),
        (["--data", "{data}", "--coco-stuff", "{data}"], "exactly one of"),
        (["--data", "{data}", "--model", "{missing}"], "unknown model"),
        (["--data", "{data}", "--model", "{empty}"], "lacks config.json"),
        (["--data", "{data}", "--clip", "ViT-B-16"], "MODEL/TAG"),
        (["--data", "{data}", "--clip", "ViT-B-16/no-such-tag"], "cannot load the open_clip"),
        (["--data", "{data}", "--crop-size", "48"], "multiple of 32"),
    ],
)
def test_train_errors_are_clear(data_root, tmp_path, args, message):
    empty = tmp_path / "empty"
    empty.mkdir()
    names = {"missing": tmp_path / "nope", "empty": empty, "data": data_root}
    args = [a.format(**names) for a in args]
    if "--model" not in args:
        args += ["--model", "deop-tiny"]
    result = train("deop", *args, "--output", tmp_path / "out", "--steps", 1)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output


def test_eval_errors_are_clear(data_root, tmp_path):
    result = runner.invoke(eval_app, ["--model", str(tmp_path / "nope"), "--data", str(data_root)])
    assert result.exit_code == 2 and "unknown model" in result.output
    result = runner.invoke(eval_app, ["--model", "deop-tiny", "--data", str(tmp_path / "nope")])
    assert result.exit_code == 2 and "not found" in result.output
    result = runner.invoke(
        eval_app, ["--model", "deop-tiny", "--data", str(data_root), "--unseen", "sky"]
    )
    assert result.exit_code == 2 and "'sky' is not in" in result.output


def test_coco_stuff_layout_trains_and_evaluates(tmp_path):
    import numpy as np
    from PIL import Image

    root = tmp_path / "coco"
    for split in ("train2017", "val2017"):
        (root / "images" / split).mkdir(parents=True)
        (root / "stuffthingmaps_detectron2" / split).mkdir(parents=True)
        for index in range(2):
            label = np.full((64, 64), 255, dtype=np.uint8)  # 255 = ignore
            label[:32] = 19 + index  # cow (unseen), then elephant
            label[32:] = 156  # sky-other
            image = np.where(label[..., None] == 156, 200, 90).astype(np.uint8).repeat(3, 2)
            Image.fromarray(image).save(root / "images" / split / f"{index:012d}.jpg")
            Image.fromarray(label).save(
                root / "stuffthingmaps_detectron2" / split / f"{index:012d}.png"
            )
    out = tmp_path / "out"
    ok(train("deop", "--coco-stuff", root, "--split", "train2017", "--model", "deop-tiny",
             "--output", out, "--steps", 1, "--batch-size", 2, "--unseen", "cow"))  # fmt: skip
    stage = json.loads((out / "training" / "stage.json").read_text())
    assert len(stage["classes"]) == 170 and stage["unseen"] == ["cow"]
    result = ok(runner.invoke(eval_app, ["--model", str(out), "--coco-stuff", str(root),
                                         "--unseen", "cow", "--json"]))  # fmt: skip
    report = json.loads(result.stdout)
    assert len(report["per_class"]) == 171 and report["num_images"] == 2


def test_a_corrupt_mask_met_in_a_loader_worker_is_one_line(data_root, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(data_root, data)
    bad = data / "masks" / "img005.png"
    bad.write_bytes(bad.read_bytes()[:40])  # truncated; img000 (checked up front) is fine
    args = ["deop", "--data", data, "--model", "deop-tiny", "--output", tmp_path / "out",
            "--steps", 4, "--batch-size", 2, "--workers", 1, "--no-progress"]  # fmt: skip
    result = runner.invoke(train_app, [str(a) for a in args])
    assert result.exit_code == 2, result.output + repr(result.exception)
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and str(bad) in errors[0], result.output
    assert "Traceback" not in result.output and "worker process" not in result.output


# -- --clip: the CLIP's safetensors through hub.resolve_clip, never a pickle ------------------


def _tiny_open_clip_folder(folder):
    """deop-tiny's CLIP architecture with random weights, in open_clip's Hub format."""
    from safetensors.torch import save_file

    from onepass_ovs.config import ClipConfig
    from onepass_ovs.models.towers import TINY_CLIP_CFG, create_clip

    torch.manual_seed(11)
    clip = create_clip(ClipConfig(model_cfg=copy.deepcopy(TINY_CLIP_CFG))).eval()
    folder.mkdir(parents=True)
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CLIP_CFG}))
    state = {k: v.contiguous() for k, v in clip.state_dict().items()}
    save_file(state, str(folder / "open_clip_model.safetensors"))
    return clip


@pytest.fixture
def clip_tag(tmp_path, monkeypatch):
    """An open_clip tag 'Onepass-Tiny/shapes' whose Hub repo sits in an offline HF cache
    (the default cache, as inference uses it), next to a pickled .bin that must never load."""
    import copy

    import huggingface_hub.constants
    from open_clip import factory, pretrained

    from onepass_ovs.models.towers import TINY_CLIP_CFG

    clip = _tiny_open_clip_folder(tmp_path / "clip")
    (tmp_path / "clip" / "open_clip_pytorch_model.bin").write_bytes(b"\x80\x04 a pickle")
    monkeypatch.setitem(factory._MODEL_CONFIGS, "Onepass-Tiny", copy.deepcopy(TINY_CLIP_CFG))
    monkeypatch.setitem(
        pretrained._PRETRAINED, "Onepass-Tiny", {"shapes": {"hf_hub": "someone/tiny-clip/"}}
    )
    cache = tmp_path / "hf_cache"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    unpickled = []

    def no_torch_load(*args, **kwargs):
        unpickled.append(args[0] if args else kwargs)
        raise AssertionError(f"torch.load called on {args[:1]}")

    monkeypatch.setattr(torch, "load", no_torch_load)
    return clip, tmp_path / "clip", cache, unpickled


def test_train_clip_loads_the_safetensors_inference_uses(data_root, tmp_path, clip_tag):
    from onepass_ovs.hub import resolve_clip

    clip, folder, cache, unpickled = clip_tag
    hub_helpers.populate_hf_cache(cache, "someone/tiny-clip", sorted(folder.iterdir()))
    out = tmp_path / "out"
    ok(train("deop", "--data", data_root, "--model", "deop-tiny", "--clip", "Onepass-Tiny/shapes",
             "--output", out, "--steps", 1, "--batch-size", 2))  # fmt: skip
    assert unpickled == []
    model = Segmenter.from_pretrained(out, device="cpu").model  # CLIP frozen in this stage
    assert torch.equal(model.clip_visual.conv1.weight, clip.visual.conv1.weight)
    assert torch.equal(model.text.token_embedding.weight, clip.token_embedding.weight)
    # the very file inference resolves the same name to (one cache for both)
    source = resolve_clip("clip:Onepass-Tiny/shapes")
    assert source.weights.name == "open_clip_model.safetensors" and cache in source.weights.parents


def test_train_clip_never_unpickles_and_takes_local_folders(tmp_path, clip_tag):
    from onepass_ovs.training.stages import load_clip_weights

    clip, folder, cache, unpickled = clip_tag
    hub_helpers.populate_hf_cache(
        cache, "someone/tiny-clip", [folder / "open_clip_pytorch_model.bin"]
    )
    segmenter = Segmenter.from_config("deop-tiny", device="cpu", seed=0)
    with pytest.raises(ValueError, match="open_clip_model.safetensors"):
        load_clip_weights(segmenter, "Onepass-Tiny/shapes")
    assert unpickled == []  # only the pickled .bin is cached: refused, never loaded

    load_clip_weights(segmenter, f"local-dir:{folder}")
    assert torch.equal(segmenter.model.clip_visual.conv1.weight, clip.visual.conv1.weight)
    segmenter.save_pretrained(tmp_path / "saved")  # a onepass model is not a CLIP to load
    with pytest.raises(ValueError, match="--model instead of --clip"):
        load_clip_weights(segmenter, str(tmp_path / "saved"))
    assert unpickled == []
