"""``ovs-train`` and ``ovs-eval`` end to end on a tiny synthetic dataset (CPU).

train (prompt -> proposals -> deop) -> evaluate (--json and table) -> ``ovs-segment``
with the trained folder; ``--resume``; and the error paths a user meets first.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from onepass_ovs import Segmenter
from onepass_ovs.cli import segment_app
from onepass_ovs.evaluation.cli import app as eval_app
from onepass_ovs.training.cli import app as train_app

_spec = importlib.util.spec_from_file_location(
    "_stage_helpers", Path(__file__).with_name("_stage_helpers.py")
)
helpers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(helpers)

runner = CliRunner()
FAST = ["--workers", "0", "--no-progress", "--log-every", "1"]


@pytest.fixture(autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return helpers.write_rectangles(tmp_path_factory.mktemp("rectangles"), n=8)


def train(*args):
    result = runner.invoke(train_app, [str(a) for a in args] + FAST)
    return result


def ok(result):
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result


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

    real_loss, calls = _common.stage_loss, []

    def crash_in_step_three(model, batch):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("simulated preemption")
        return real_loss(model, batch)

    monkeypatch.setattr(_common, "stage_loss", crash_in_step_three)
    assert train("deop", *common, "--output", tmp_path / "cut").exit_code != 0
    monkeypatch.setattr(_common, "stage_loss", real_loss)
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
