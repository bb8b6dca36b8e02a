"""Saving, loading and name resolution: local folders, the HF cache offline, errors."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from onepass_ovs import ModelNotAvailableError, Segmenter, list_models
from onepass_ovs.hub import parse_hub_id

VOCAB = ["cat", "dog", "grass, lawn"]


def test_save_writes_exactly_two_files(tiny_saved):
    assert sorted(p.name for p in tiny_saved.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((tiny_saved / "config.json").read_text())
    assert config["family"] == "deop"
    assert config["preprocess"]["short_side"] == 64 and "clip_mean" in config["preprocess"]
    assert config["clip"]["model_cfg"]["vision_cfg"]["patch_size"] == 16


def test_round_trip_identical_outputs(tiny_segmenter, tiny_saved, rgb_image):
    loaded = Segmenter.from_pretrained(tiny_saved)
    a = tiny_segmenter.segment(rgb_image, VOCAB)
    b = loaded.segment(rgb_image, VOCAB)
    np.testing.assert_allclose(a.probs, b.probs, atol=1e-6)  # text batches may differ
    state_a, state_b = tiny_segmenter.model.state_dict(), loaded.model.state_dict()
    assert state_a.keys() == state_b.keys()
    assert all((state_a[k] == state_b[k]).all() for k in state_a)


def _populate_hf_cache(cache, repo, folder, commit="0123456789abcdef0123456789abcdef01234567"):
    """Lay out a Hugging Face hub cache entry by hand (what a previous download leaves)."""
    root = cache / f"models--{repo.replace('/', '--')}"
    snapshot = root / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        shutil.copy(folder / name, snapshot / name)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(commit)
    return commit


def test_hf_hub_from_prepopulated_cache_offline(tiny_segmenter, tiny_saved, tmp_path, monkeypatch, rgb_image):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    commit = _populate_hf_cache(tmp_path, "someone/tiny-deop", tiny_saved)
    loaded = Segmenter.from_pretrained("hf-hub:someone/tiny-deop", cache_dir=tmp_path)
    np.testing.assert_allclose(
        loaded.segment(rgb_image, VOCAB).probs, tiny_segmenter.segment(rgb_image, VOCAB).probs,
        atol=1e-6,
    )
    # a pinned revision (commit) resolves too
    Segmenter.from_pretrained(f"hf-hub:someone/tiny-deop@{commit}", cache_dir=tmp_path)


def test_offline_and_not_cached_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotAvailableError, match="hf-hub:nobody/missing") as info:
        Segmenter.from_pretrained("hf-hub:nobody/missing", cache_dir=tmp_path)
    assert "HF_HUB_OFFLINE" in str(info.value) and "demo" in str(info.value)


def test_local_files_only_is_honoured(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(ModelNotAvailableError, match="local_files_only"):
        Segmenter.from_pretrained("hf-hub:nobody/missing", cache_dir=tmp_path, local_files_only=True)


def test_name_errors(tmp_path):
    with pytest.raises(ModelNotAvailableError, match="unknown model"):
        Segmenter.from_pretrained("no-such-model")
    with pytest.raises(ModelNotAvailableError, match="from_config"):
        Segmenter.from_pretrained("deop-tiny")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelNotAvailableError, match="model.safetensors"):
        Segmenter.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="hf-hub:org/repo"):
        parse_hub_id("hf-hub:just-a-name")
    assert parse_hub_id("hf-hub:a/b@v1") == ("a/b", "v1")


def test_corrupt_or_mismatched_weights(tiny_saved, tmp_path):
    folder = tmp_path / "bad"
    shutil.copytree(tiny_saved, folder)
    (folder / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="cannot read weights"):
        Segmenter.from_pretrained(folder)
    config = json.loads((tiny_saved / "config.json").read_text())
    config["deop"]["proposals"]["num_queries"] = 7
    shutil.copy(tiny_saved / "model.safetensors", folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="shape"):
        Segmenter.from_pretrained(folder)


def test_list_models_and_presets():
    names = list_models()
    assert {"deop-tiny", "deop-vit-b16", "demo"} <= set(names)
    assert "deop-tiny" not in list_models(pretrained_only=True)
    with pytest.raises(ValueError, match="unknown preset"):
        Segmenter.from_config("deop-huge")


def test_from_config_accepts_dict_and_dataclass():
    from onepass_ovs.models.registry import preset_config

    cfg = preset_config("deop-tiny")
    a = Segmenter.from_config(cfg.to_dict(), seed=3)
    b = Segmenter.from_config(cfg, seed=3)
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert all((sa[k] == sb[k]).all() for k in sa)
    with pytest.raises(ValueError, match="lacks"):
        Segmenter.from_config({"family": "deop", "bogus": 1})
    with pytest.raises(ValueError, match="unknown key 'bogus'"):
        Segmenter.from_config({**cfg.to_dict(), "bogus": 1})


def test_dtype_and_device_options(tiny_saved):
    import torch

    seg = Segmenter.from_pretrained(tiny_saved, device="cpu", dtype="bfloat16")
    assert next(seg.model.parameters()).dtype == torch.bfloat16
    res = seg.segment(np.zeros((32, 32, 3), np.uint8), VOCAB)
    assert res.label_map.shape == (32, 32)
