"""Tests of the generic training engine (CPU, tiny conv net, synthetic data)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

import _stage_helpers as helpers
from onepass_ovs.data import DatasetError
from onepass_ovs.training import checkpoints
from onepass_ovs.training.checkpoints import (
    find_latest_checkpoint,
    list_checkpoints,
    load_model_weights,
)
from onepass_ovs.training.config import TrainConfig
from onepass_ovs.training.optim import param_groups
from onepass_ovs.training.sampling import SampleOrder
from onepass_ovs.training.schedule import lr_factor

_WORKER_PATH = Path(__file__).with_name("_engine_worker.py")
_spec = importlib.util.spec_from_file_location("_engine_worker", _WORKER_PATH)
worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(worker)


one_thread = helpers.one_thread  # autouse: one torch thread per test


def read_log(output_dir) -> list[dict]:
    lines = (Path(output_dir) / "train_log.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def losses(output_dir) -> list[float]:
    return [entry["loss"] for entry in read_log(output_dir)]


def assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    state_b = b.state_dict()
    for name, value in a.state_dict().items():
        assert torch.equal(value, state_b[name]), name


# ------------------------------------------------------------------------- basics


def test_loss_falls_and_log_has_every_term(tmp_path):
    trainer = worker.make_trainer(tmp_path, steps=40, lr=2e-2)
    trainer.fit()
    log = read_log(tmp_path)
    assert [entry["step"] for entry in log] == list(range(1, 41))
    assert {"step", "loss", "pixel_acc", "lr", "time"} <= set(log[0])
    curve = [entry["loss"] for entry in log]
    assert sum(curve[-5:]) / 5 < 0.6 * sum(curve[:5]) / 5
    assert log[-1]["pixel_acc"] > log[0]["pixel_acc"]


def test_config_json_round_trip_and_validation(tmp_path):
    config = TrainConfig(steps=5, lr_multipliers={"backbone": 0.1}, grad_clip_norm=0.01)
    restored = TrainConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert restored == config
    with pytest.raises(TypeError, match="unknown"):
        TrainConfig.from_dict({"stepz": 3})
    with pytest.raises(ValueError):
        TrainConfig(amp="fp16")


def test_schedules_match_closed_form():
    poly = TrainConfig(steps=100, lr_schedule="poly")
    cosine = TrainConfig(steps=100, lr_schedule="cosine")
    warm = TrainConfig(steps=100, lr_schedule="poly", warmup_steps=10)
    for step in (0, 1, 37, 50, 99):
        assert lr_factor(step, poly) == pytest.approx((1 - step / 100) ** 0.9, rel=1e-12)
        expected_cos = 0.5 * (1 + math.cos(math.pi * step / 100))
        assert lr_factor(step, cosine) == pytest.approx(expected_cos, rel=1e-12)
    assert lr_factor(3, warm) == pytest.approx(0.4 * (1 - 3 / 100) ** 0.9)
    assert lr_factor(10, warm) == pytest.approx((1 - 10 / 100) ** 0.9)
    floor = TrainConfig(steps=100, lr_schedule="cosine", min_lr_ratio=0.1)
    assert lr_factor(99, floor) == pytest.approx(0.1 + 0.9 * lr_factor(99, cosine))


def test_trainer_applies_schedule_and_multipliers_to_every_group(tmp_path):
    seen: list[dict[float, float]] = []

    def recording_loss(model, batch):
        # lr is set before the micro-steps, so the optimizer's groups show this step's lr.
        seen.append({g["lr_multiplier"]: g["lr"] for g in trainer.optimizer.param_groups})
        return worker.segmentation_loss(model, batch)

    trainer = worker.make_trainer(
        tmp_path, steps=6, lr=1e-3, loss_fn=recording_loss, lr_multipliers={"stem": 0.1}
    )
    trainer.fit()
    assert len(seen) == 6
    for step, lrs in enumerate(seen):
        factor = (1 - step / 6) ** 0.9
        assert lrs[1.0] == pytest.approx(1e-3 * factor, rel=1e-12)
        assert lrs[0.1] == pytest.approx(1e-4 * factor, rel=1e-12)
    assert [e["lr"] for e in read_log(tmp_path)] == pytest.approx(
        [1e-3 * (1 - s / 6) ** 0.9 for s in range(6)]
    )


class _Composite(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = worker.TinySegNet()
        self.token_embedding = nn.Embedding(5, 8)
        self.query_pos = nn.Parameter(torch.zeros(4, 8))
        self.decompose = nn.Parameter(torch.zeros(8))  # "pos" inside a word: decays
        self.proj = nn.Linear(8, 8)
        self.ln_post = nn.LayerNorm(8)
        self.frozen = nn.Linear(8, 8)
        self.frozen.requires_grad_(False)


def test_param_groups_decay_multipliers_and_frozen():
    model = _Composite()
    groups = param_groups(model, 1e-3, 0.05, lr_multipliers={"backbone": 0.1, "backbone.head": 0.5})
    by_name = {}
    for group in groups:
        assert len(group["params"]) == len(group["param_names"])
        for name, param in zip(group["param_names"], group["params"], strict=True):
            assert param is model.get_parameter(name)
            by_name[name] = (group["lr"], group["weight_decay"])
    expected = {
        "backbone.stem.weight": (1e-4, 0.05),
        "backbone.stem.bias": (1e-4, 0.0),
        "backbone.norm.weight": (1e-4, 0.0),  # GroupNorm module
        "backbone.norm.bias": (1e-4, 0.0),
        "backbone.pos": (1e-4, 0.0),
        "backbone.head.weight": (5e-4, 0.05),  # longest prefix wins
        "backbone.head.bias": (5e-4, 0.0),
        "token_embedding.weight": (1e-3, 0.0),
        "query_pos": (1e-3, 0.0),
        "decompose": (1e-3, 0.05),
        "proj.weight": (1e-3, 0.05),
        "proj.bias": (1e-3, 0.0),
        "ln_post.weight": (1e-3, 0.0),
        "ln_post.bias": (1e-3, 0.0),
    }
    assert by_name.keys() == expected.keys()  # frozen.* excluded
    for name, (lr, decay) in expected.items():
        assert by_name[name][0] == pytest.approx(lr), name
        assert by_name[name][1] == decay, name
    with pytest.raises(ValueError, match="match no parameter"):
        param_groups(model, 1e-3, 0.05, lr_multipliers={"backbon": 0.1})


def test_grad_clipping_bounds_the_update(tmp_path):
    def one_sgd_step(folder, clip):
        trainer = worker.make_trainer(
            folder, steps=1, optimizer="sgd", momentum=0.0, weight_decay=0.0, lr=1.0,
            lr_schedule="constant", grad_clip_norm=clip,
        )  # fmt: skip
        before = [p.detach().clone() for p in trainer.trainable]
        trainer.fit()
        update = torch.cat(
            [(p - b).flatten() for p, b in zip(trainer.trainable, before, strict=True)]
        )
        return update.norm().item(), read_log(folder)[0]["grad_norm"]

    clipped_norm, grad_norm = one_sgd_step(tmp_path / "clipped", 0.01)
    unclipped_norm, same_grad_norm = one_sgd_step(tmp_path / "unclipped", 1e6)
    assert grad_norm == pytest.approx(same_grad_norm, rel=1e-6) and grad_norm > 0.1
    # With SGD at lr 1 the update is the (clipped) gradient itself.
    assert unclipped_norm == pytest.approx(grad_norm, rel=1e-4)
    assert clipped_norm == pytest.approx(0.01, rel=1e-4)


def test_bf16_autocast_is_active(tmp_path):
    dtypes = []

    def loss_fn(model, batch):
        logits = model(batch["image"])
        dtypes.append(logits.dtype)
        return {"loss": torch.nn.functional.cross_entropy(logits.float(), batch["target"])}

    trainer = worker.make_trainer(tmp_path, steps=3, amp="bf16", loss_fn=loss_fn)
    model = trainer.fit()
    assert dtypes == [torch.bfloat16] * 3
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(math.isfinite(x) for x in losses(tmp_path))


def test_gradient_accumulation_equals_full_batch(tmp_path):
    full = worker.make_trainer(tmp_path / "full", dropout=0.0, steps=5, batch_size=4)
    accum = worker.make_trainer(
        tmp_path / "accum", dropout=0.0, steps=5, batch_size=2, grad_accum_steps=2
    )
    full_model, accum_model = full.fit(), accum.fit()
    assert losses(tmp_path / "accum") == pytest.approx(losses(tmp_path / "full"), rel=1e-5)
    accum_state = accum_model.state_dict()
    for name, value in full_model.state_dict().items():
        torch.testing.assert_close(value, accum_state[name], rtol=1e-5, atol=1e-6, msg=name)


# ------------------------------------------------------------------------- data order


def test_sample_order_is_a_padded_sharded_permutation():
    orders = [SampleOrder(10, seed=3, rank=r, world_size=4) for r in range(4)]
    assert orders[0].per_rank == 3
    for epoch in (0, 1):
        shards = [order.epoch_shard(epoch) for order in orders]
        flat = [i for shard in shards for i in shard]
        assert len(flat) == 12 and set(flat) == set(range(10))  # 2 padding repeats
    assert orders[0].epoch_shard(0) != orders[0].epoch_shard(1)
    stream = orders[1].stream()
    first = [next(stream) for _ in range(9)]
    resumed = orders[1].stream(start=4)
    assert [next(resumed) for _ in range(5)] == first[4:]
    assert [e for e, _ in first] == [0, 0, 0, 1, 1, 1, 2, 2, 2]


def test_data_order_and_augmentation_ignore_worker_count(tmp_path):
    def recording_run(folder, num_workers):
        seen = []

        def loss_fn(model, batch):
            seen.append((batch["index"].tolist(), batch["image"].sum().item()))
            return worker.segmentation_loss(model, batch)

        trainer = worker.make_trainer(folder, steps=8, num_workers=num_workers, loss_fn=loss_fn)
        trainer.fit()
        return seen

    inline = recording_run(tmp_path / "w0", 0)
    workers = recording_run(tmp_path / "w2", 2)
    assert inline == workers
    stream = SampleOrder(24, seed=7).stream()
    expected = [[next(stream)[1] for _ in range(4)] for _ in range(8)]
    assert [indices for indices, _ in inline] == expected
    assert sorted(i for indices in expected[:6] for i in indices) == list(range(24))


# ------------------------------------------------------------------------- checkpoints


def test_checkpoints_are_safetensors_and_json_only_and_pruned(tmp_path):
    trainer = worker.make_trainer(tmp_path, steps=6, checkpoint_every=2, keep_checkpoints=2)
    model = trainer.fit()
    assert [step for step, _ in list_checkpoints(tmp_path)] == [4, 6]
    latest = find_latest_checkpoint(tmp_path)
    assert latest.name == "step_00000006"
    names = sorted(p.name for p in latest.iterdir())
    assert names == [
        "model.safetensors",
        "optimizer.safetensors",
        "rng.safetensors",
        "trainer_state.json",
    ]
    for path in latest.iterdir():
        head = path.read_bytes()[:2]
        assert head[:1] != b"\x80" and head != b"PK"  # neither a pickle nor torch.save zip
        if path.suffix == ".json":
            state = json.loads(path.read_text())
            assert state["step"] == 6 and state["config"]["seed"] == 7
        else:
            with safe_open(str(path), framework="pt") as handle:
                assert handle.metadata()["step"] == "6"
    rng = load_file(latest / "rng.safetensors")
    assert rng["rank0.torch_cpu"].dtype == torch.uint8
    assert any(k.endswith("exp_avg") for k in load_file(latest / "optimizer.safetensors"))
    assert TrainConfig.from_dict(json.loads((tmp_path / "config.json").read_text()))
    fresh = worker.TinySegNet()
    load_model_weights(fresh, latest)
    assert_same_weights(fresh, model)
    with pytest.raises(FileExistsError):  # a fresh run must not clobber checkpoints
        worker.make_trainer(tmp_path, steps=6).fit()


def test_resume_reproduces_the_uninterrupted_run(tmp_path, monkeypatch):
    full = worker.make_trainer(tmp_path / "full", steps=10, checkpoint_every=6).fit()

    crashing = worker.make_trainer(
        tmp_path / "run", steps=10, checkpoint_every=6, loss_fn=worker.CrashAt(8)
    )
    with pytest.raises(KeyboardInterrupt):
        crashing.fit()
    assert [s for s, _ in list_checkpoints(tmp_path / "run")] == [6]
    assert [e["step"] for e in read_log(tmp_path / "run")] == list(range(1, 8))

    torch.manual_seed(12345)  # whatever the process did meanwhile must not matter
    resumed = worker.make_trainer(tmp_path / "run", steps=10, checkpoint_every=6)
    model = resumed.fit(resume="auto")
    assert [e["step"] for e in read_log(tmp_path / "run")] == list(range(1, 11))
    assert losses(tmp_path / "run") == losses(tmp_path / "full")  # bitwise
    assert_same_weights(model, full)

    # Control: without restoring the RNG the dropout masks differ and so do the losses,
    # so the equality above really depends on the saved RNG state.
    monkeypatch.setattr(checkpoints, "restore_rng", lambda *args: None)
    unrestored = worker.make_trainer(tmp_path / "run", steps=10, checkpoint_every=6)
    unrestored.fit(resume=tmp_path / "run" / "checkpoints" / "step_00000006")
    assert losses(tmp_path / "run")[6:] != losses(tmp_path / "full")[6:]


def test_crash_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    reference = worker.make_trainer(tmp_path / "ref", steps=9, checkpoint_every=3).fit()

    real_replace = os.replace

    def dying_replace(src, dst):
        if Path(src).name.startswith(".step_00000006.tmp"):
            raise OSError("simulated kill during the checkpoint rename")
        return real_replace(src, dst)

    monkeypatch.setattr(checkpoints.os, "replace", dying_replace)
    run_dir = tmp_path / "run"
    with pytest.raises(OSError, match="simulated kill"):
        worker.make_trainer(run_dir, steps=9, checkpoint_every=3).fit()
    monkeypatch.setattr(checkpoints.os, "replace", real_replace)

    root = run_dir / "checkpoints"
    (temp,) = root.glob(".step_00000006.tmp-*")
    assert (temp / "model.safetensors").is_file()  # fully written, never renamed
    with open(temp / "model.safetensors", "r+b") as handle:
        handle.truncate(10)  # and a torn file for good measure
    (root / "step_00000009").mkdir()  # a half-created folder with no state file
    assert find_latest_checkpoint(run_dir).name == "step_00000003"

    model = worker.make_trainer(run_dir, steps=9, checkpoint_every=3).fit(resume="auto")
    assert_same_weights(model, reference)
    assert losses(run_dir) == losses(tmp_path / "ref")
    assert not list(root.glob(".step_*"))  # leftovers cleaned by the next save


def test_resume_skips_a_damaged_newest_checkpoint_naming_it(tmp_path, caplog):
    reference = worker.make_trainer(tmp_path / "ref", steps=9, checkpoint_every=3).fit()
    run_dir = tmp_path / "run"
    crashing = worker.make_trainer(run_dir, steps=9, checkpoint_every=3, loss_fn=worker.CrashAt(8))
    with pytest.raises(KeyboardInterrupt):
        crashing.fit()
    newest = run_dir / "checkpoints" / "step_00000006"
    assert [s for s, _ in list_checkpoints(run_dir)] == [3, 6]
    weights = newest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-40])  # a torn copy: still "complete"
    assert find_latest_checkpoint(run_dir) == newest

    with pytest.raises(checkpoints.CheckpointError, match=r"step_00000006: model.safetensors"):
        checkpoints.read_checkpoint(newest)
    with caplog.at_level("WARNING", logger="onepass_ovs.training"):
        model = worker.make_trainer(run_dir, steps=9, checkpoint_every=3).fit(resume="auto")
    warned = "\n".join(r.getMessage() for r in caplog.records)
    assert "step_00000006" in warned and "step_00000003" in warned
    # resumed from step 3: the result is the uninterrupted run's, bit for bit
    assert_same_weights(model, reference)
    assert losses(run_dir) == losses(tmp_path / "ref")
    checkpoints.read_checkpoint(newest)  # rewritten whole when training passed step 6


def test_damaged_checkpoints_are_detected_and_never_silently_skipped(tmp_path):
    run_dir = tmp_path / "run"
    worker.make_trainer(run_dir, steps=4, checkpoint_every=2).fit()
    first, second = (path for _, path in list_checkpoints(run_dir))
    # same size, one flipped byte in the tensor data: caught by the recorded sha256
    optimizer_file = second / "optimizer.safetensors"
    data = bytearray(optimizer_file.read_bytes())
    data[-3] ^= 0x55
    optimizer_file.write_bytes(bytes(data))
    with pytest.raises(checkpoints.CheckpointError, match="optimizer.safetensors fails its sha256"):
        checkpoints.read_checkpoint(second)
    # an explicit path is not replaced by another checkpoint: the error names it
    with pytest.raises(checkpoints.CheckpointError, match="step_00000004"):
        worker.make_trainer(run_dir, steps=6).fit(resume=second)
    (first / "trainer_state.json").write_text('{"format": "onepass_ovs.train')  # torn JSON
    with pytest.raises(checkpoints.CheckpointError, match="no usable checkpoint") as info:
        worker.make_trainer(run_dir, steps=6).fit(resume="auto")
    assert "step_00000002" in str(info.value) and "step_00000004" in str(info.value)


class _DatasetWithABadFile(worker.TinySegData):
    def __getitem__(self, index: int) -> dict:
        if index == 5:
            raise DatasetError("cannot read mask /data/masks/x005.png: image file is truncated")
        return super().__getitem__(index)


@pytest.mark.parametrize("num_workers", [0, 1])
def test_a_dataset_error_in_a_loader_worker_keeps_its_own_message(tmp_path, num_workers):
    config = TrainConfig(
        steps=12, batch_size=4, num_workers=num_workers, progress_bar=False, checkpoint_every=0,
        output_dir=str(tmp_path), device="cpu",
    )  # fmt: skip
    trainer = worker.Trainer(
        worker.TinySegNet(), worker.segmentation_loss, _DatasetWithABadFile(), config
    )
    with pytest.raises(DatasetError) as info:
        trainer.fit()
    # not "Caught DatasetError in DataLoader worker process 0. Original Traceback ..."
    assert str(info.value) == "cannot read mask /data/masks/x005.png: image file is truncated"


def test_frozen_params_can_stay_out_of_checkpoints(tmp_path):
    def build():
        worker.seed_everything(0)
        model = worker.TinySegNet()
        model.stem.requires_grad_(False)
        config = TrainConfig(
            steps=4, batch_size=4, checkpoint_every=2, save_frozen_params=False, num_workers=0,
            progress_bar=False, output_dir=str(tmp_path), device="cpu",
        )  # fmt: skip
        return worker.Trainer(model, worker.segmentation_loss, worker.TinySegData(), config)

    saved = []
    trainer = build()
    trainer.on_checkpoint = lambda path, step: saved.append((path.name, step))
    model = trainer.fit()
    assert saved == [("step_00000002", 2), ("step_00000004", 4)]
    stored = load_file(tmp_path / "checkpoints" / "step_00000004" / "model.safetensors")
    assert not any(k.startswith("stem.") for k in stored) and "head.weight" in stored
    assert all(torch.equal(model.state_dict()[k], v) for k, v in stored.items())
    resumed = build()  # rebuilt with the same frozen stem, as the contract asks
    resumed.fit(resume=tmp_path / "checkpoints" / "step_00000002")
    assert_same_weights(resumed.model, model)


# ------------------------------------------------------------------------- two processes


@pytest.mark.slow
def test_two_process_gloo_matches_single_process(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        str(_WORKER_PATH), str(tmp_path),
    ]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    def weights(name):
        return [load_file(tmp_path / f"rank{r}_{name}.safetensors") for r in (0, 1)]

    for name in ("ddp", "full", "resumed"):
        rank0, rank1 = weights(name)
        assert all(torch.equal(rank0[k], rank1[k]) for k in rank0), name
    # Killed and resumed under DDP: bitwise the uninterrupted DDP run, per-rank RNG included.
    full, resumed = weights("full")[0], weights("resumed")[0]
    assert all(torch.equal(full[k], resumed[k]) for k in full)
    assert losses(tmp_path / "resumed") == losses(tmp_path / "full")

    # 2 ranks x batch 2 see the same 4 samples per step as one process at batch 4.
    single = worker.make_trainer(tmp_path / "single", dropout=0.0, steps=4, batch_size=4)
    single_state = single.fit().state_dict()
    for key, value in weights("ddp")[0].items():
        torch.testing.assert_close(value, single_state[key], rtol=1e-5, atol=1e-6, msg=key)
    ddp_log = read_log(tmp_path / "ddp")
    assert [e["step"] for e in ddp_log] == [1, 2, 3, 4]  # rank 0 alone writes the log
    assert [e["loss"] for e in ddp_log] == pytest.approx(losses(tmp_path / "single"), rel=1e-5)
