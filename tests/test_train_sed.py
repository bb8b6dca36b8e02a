"""``ovs-train sed`` and ``train_sed`` end to end on a tiny synthetic dataset (CPU).

The CLI writes a loadable SED; ``--clip`` copies an open_clip ConvNeXt CLIP's image trunk,
head and text tower from safetensors; an interrupted run resumes to the bit-identical
result of an uninterrupted one.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

import _stage_helpers as helpers
from onepass_ovs import Segmenter

one_thread = helpers.one_thread  # autouse: one torch thread per test


data_root = helpers.rectangles_fixture(n=8)


train, ok = helpers.train, helpers.ok


def test_cli_trains_a_loadable_sed(data_root, tmp_path):
    out = tmp_path / "sed"
    result = ok(train("sed", "--data", data_root, "--model", "sed-tiny", "--output", out,
                      "--steps", 2, "--batch-size", 2, "--lr", "1e-3",
                      "--unseen", "yellow box"))  # fmt: skip
    assert "saved the trained model" in result.output
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "training"]
    run = out / "training"
    stage = json.loads((run / "stage.json").read_text())
    assert stage["stage"] == "sed" and stage["unseen"] == ["yellow box"]
    assert stage["classes"] == [c for c in helpers.CLASSES if c != "yellow box"]
    assert stage["crop_size"] == 64  # sed-tiny's short side
    recorded = json.loads((run / "config.json").read_text())
    assert recorded["lr"] == 1e-3 and recorded["lr_multipliers"] == {"clip_visual": 0.01}
    assert recorded["grad_clip_norm"] == 0.01 and recorded["lr_schedule"] == "cosine"
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log] == [1, 2]
    assert all(k in log[0] for k in ("loss_final", "loss_aux0", "loss_aux1", "loss_aux2"))

    trained = Segmenter.from_pretrained(out, device="cpu")
    assert trained.config.family == "sed"
    start = Segmenter.from_config("sed-tiny", device="cpu", seed=0).model.state_dict()
    after = trained.model.state_dict()
    changed = {k for k in start if not torch.equal(start[k], after[k])}
    assert any(k.startswith("decoder.") for k in changed)
    assert any(k.startswith("clip_visual.") for k in changed)
    assert not any(k.startswith("text.") for k in changed), "the text tower must stay frozen"
    image = data_root / "images" / "img000.png"
    from PIL import Image

    result = trained.segment(Image.open(image), helpers.CLASSES)
    assert tuple(result.label_map.shape) == (64, 64)


def test_cli_sed_errors_are_clear(data_root, tmp_path):
    result = train("sed", "--data", data_root, "--model", "deop-tiny", "--output",
                   tmp_path / "a", "--steps", 1)  # fmt: skip
    assert result.exit_code == 2 and "trains 'sed' models" in result.output
    result = train("sed", "--data", data_root, "--model", "sed-tiny", "--output",
                   tmp_path / "b", "--steps", 1, "--crop-size", 48)  # fmt: skip
    assert result.exit_code == 2 and "multiple of 32" in result.output
    assert "Traceback" not in result.output


# -- --clip: an open_clip ConvNeXt CLIP from safetensors -------------------------------------


def _tiny_convnext_clip_folder(folder, *, vit: bool = False):
    """sed-tiny's ConvNeXt CLIP (or deop-tiny's ViT CLIP) with random weights, in
    open_clip's folder format (``open_clip_config.json`` + safetensors)."""
    from safetensors.torch import save_file

    from onepass_ovs.config import ClipConfig
    from onepass_ovs.models.sed import TINY_CONVNEXT_CLIP_CFG
    from onepass_ovs.models.towers import TINY_CLIP_CFG, create_clip

    cfg = copy.deepcopy(TINY_CLIP_CFG if vit else TINY_CONVNEXT_CLIP_CFG)
    torch.manual_seed(23)
    clip = create_clip(ClipConfig(model_cfg=copy.deepcopy(cfg))).eval()
    folder.mkdir(parents=True)
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg}))
    state = {k: v.detach().clone().contiguous() for k, v in clip.state_dict().items()}
    save_file(state, str(folder / "open_clip_model.safetensors"))
    return clip


def test_cli_clip_loads_a_convnext_clip_into_sed(data_root, tmp_path, monkeypatch):
    from onepass_ovs.models.towers import build_dense_tower

    clip = _tiny_convnext_clip_folder(tmp_path / "clip")

    def no_torch_load(*args, **kwargs):
        raise AssertionError(f"torch.load called on {args[:1]}")

    monkeypatch.setattr(torch, "load", no_torch_load)
    out = tmp_path / "out"
    # --clip-lr-mult 0: the image tower keeps the CLIP's values exactly (AdamW at lr 0)
    ok(train("sed", "--data", data_root, "--model", "sed-tiny", "--clip",
             f"local-dir:{tmp_path / 'clip'}", "--clip-lr-mult", 0, "--output", out,
             "--steps", 1, "--batch-size", 2))  # fmt: skip
    model = Segmenter.from_pretrained(out, device="cpu").model
    assert json.loads((out / "training" / "config.json").read_text())["lr_multipliers"] == {
        "clip_visual": 0.0
    }
    expected_visual = build_dense_tower(clip.visual, model.config.clip).state_dict()
    got_visual = model.clip_visual.state_dict()
    assert set(got_visual) == set(expected_visual)
    assert all(torch.equal(got_visual[k], expected_visual[k]) for k in expected_visual)
    # the trunk's first conv and the head's projection, named as open_clip names them
    state = clip.state_dict()
    flat_ours = torch.cat([v.flatten() for v in got_visual.values()])
    for key in ("visual.trunk.stem.0.weight", "visual.head.proj.weight"):
        assert torch.isin(state[key].flatten(), flat_ours).all(), key
    assert torch.equal(model.text.token_embedding.weight, clip.token_embedding.weight)
    assert torch.equal(model.text.transformer.resblocks[0].mlp.c_fc.weight,
                       clip.transformer.resblocks[0].mlp.c_fc.weight)  # fmt: skip


def test_clip_of_the_wrong_tower_kind_is_refused(data_root, tmp_path):
    _tiny_convnext_clip_folder(tmp_path / "vit", vit=True)
    result = train("sed", "--data", data_root, "--model", "sed-tiny", "--clip",
                   f"local-dir:{tmp_path / 'vit'}", "--output", tmp_path / "out",
                   "--steps", 1)  # fmt: skip
    assert result.exit_code == 2, result.output
    assert "image tower but the 'sed' model needs a 'timm-convnext' one" in result.output
    assert "Traceback" not in result.output


# -- resume ----------------------------------------------------------------------------------


def test_interrupted_sed_run_resumes_to_the_uninterrupted_result(data_root, tmp_path, monkeypatch):
    from onepass_ovs.data import FolderDataset
    from onepass_ovs.training.stages import _common, sed_default_config, train_sed

    dataset = FolderDataset(data_root, unseen=["yellow box"])

    def config(name):
        return sed_default_config(
            steps=4, batch_size=2, lr=1e-2, num_workers=0, log_every=1, progress_bar=False,
            checkpoint_every=2, output_dir=str(tmp_path / name),
        )  # fmt: skip

    def fresh():
        return Segmenter.from_config("sed-tiny", device="cpu", seed=5)

    helpers.train_full_and_interrupted(
        monkeypatch, _common, train_sed, fresh, dataset, config, tmp_path
    )
    with pytest.raises(FileExistsError, match="resume"):
        train_sed(fresh(), dataset, config("resumed"))  # refuses to start over
    train_sed(fresh(), dataset, config("resumed"), resume="auto")

    full = load_file(tmp_path / "full" / "model.safetensors")
    resumed = load_file(tmp_path / "resumed" / "model.safetensors")
    assert set(full) == set(resumed)
    assert all(torch.equal(full[k], resumed[k]) for k in full)
    start = fresh().model.state_dict()
    assert any(not torch.equal(start[k], full[k]) for k in full if k.startswith("decoder."))

    def losses(name):
        path = tmp_path / name / "training" / "train_log.jsonl"
        return [json.loads(line)["loss"] for line in path.read_text().splitlines()]

    assert losses("resumed") == losses("full") and len(losses("full")) == 4
