"""The shipped ``demo-sed`` and ``demo-gkc`` models: offline, small, safetensors only, the
right family, and better than chance on fresh shapes scenes.

The floors sit above chance (1/31 of the classes, ~3% mIoU) and below what each model
measures on these 12 scenes (docs/shapes_world.md has the full numbers and says why the
demos are still weak), so the tests check that each demo works without being a noisy
re-run of the benchmark. Raise them when better demos ship.
"""

from __future__ import annotations

import pytest
from safetensors import safe_open

from onepass_ovs import Segmenter, list_models
from onepass_ovs.evaluation.metrics import ConfusionMatrix, seen_unseen
from onepass_ovs.hub import package_weights_dir
from onepass_ovs.toy import scenes

# name -> (family, seen mIoU floor, background IoU floor)
DEMOS = {
    "demo-sed": ("sed", 6.0, 90.0),  # measures seen 11.9, background 98.6
    "demo-gkc": ("gkc", 12.0, 90.0),  # measures seen 24.2, background 99.6
}


@pytest.mark.parametrize("name", sorted(DEMOS))
def test_demo_is_listed_shipped_small_and_safetensors_only(name):
    assert name in list_models(pretrained_only=True)
    folder = package_weights_dir(name)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    assert sum(p.stat().st_size for p in folder.iterdir()) / 2**20 <= 15.0
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
    assert "F32" not in dtypes  # stored in fp16


@pytest.mark.parametrize("name", sorted(DEMOS))
def test_demo_loads_offline_and_segments_fresh_scenes_above_chance(name, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    family, seen_floor, background_floor = DEMOS[name]
    seg = Segmenter.from_pretrained(name, device="cpu")
    assert seg.config.family == family and seg.config.name == name
    if family == "gkc":  # no CLIP image tower in the model
        assert not any(k.startswith(("clip_visual.", "visual.")) for k in seg.model.state_dict())
    names = list(scenes.CLASS_NAMES)
    matrix = ConfusionMatrix(len(names))
    batch = scenes.render_scenes(424242, 12, 128)  # a stream never used in the recipes
    results = seg.segment(list(batch.images), names, batch_size=6)
    for result, label in zip(results, batch.labels, strict=True):
        assert result.label_map.shape == label.shape
        matrix.update(result.label_map, label)
    metrics = matrix.compute()
    split = seen_unseen(metrics["per_class"], [names.index(n) for n in scenes.UNSEEN_CLASSES])
    assert metrics["per_class"][0] >= background_floor  # background
    assert split["miou_seen"] >= seen_floor
