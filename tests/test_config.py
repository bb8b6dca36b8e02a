"""config.json parsing: every field checked, old formats upgraded, bad configs named."""

from __future__ import annotations

import json

import pytest

from onepass_ovs.config import ConfigError
from onepass_ovs.hub import package_weights_dir
from onepass_ovs.models.registry import build_model, config_from_dict, load_config, preset_config


def _tiny_dict():
    return preset_config("deop-tiny").to_dict()


def test_round_trip_and_family_section_under_its_name():
    data = _tiny_dict()
    assert data["format_version"] == 2 and "deop" in data
    assert "proposals" not in data and "anchors" not in data  # no top-level DeOP parts
    assert config_from_dict(json.loads(json.dumps(data))).to_dict() == data
    clip = preset_config("clip-tiny").to_dict()
    assert "deop" not in clip and "proposals" not in clip


def test_format_1_folders_still_load():
    saved = json.loads((package_weights_dir("demo") / "config.json").read_text())
    assert saved["format_version"] == 1 and "proposals" in saved  # the shipped demo
    config = load_config(package_weights_dir("demo") / "config.json")
    assert config.family_config.proposals.num_queries == saved["proposals"]["num_queries"]
    assert config.family_config.anchors.pooling == saved["anchors"]["pooling"]
    # a format-1 clip model stored DeOP's sections it never used: dropped on load
    clip = preset_config("clip-tiny").to_dict()
    clip.update(format_version=1, proposals=saved["proposals"], anchors=saved["anchors"])
    assert config_from_dict(clip).family_config is None


def test_missing_preprocess_is_an_error_not_a_silent_default(tmp_path):
    data = _tiny_dict()
    del data["preprocess"]
    with pytest.raises(ConfigError, match="preprocess"):
        config_from_dict(data)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=str(path)):
        load_config(path)


def test_json_array_and_empty_config(tmp_path):
    path = tmp_path / "config.json"
    path.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="must be a JSON object, got list"):
        load_config(path)
    with pytest.raises(ConfigError, match="lacks"):  # nothing is built from an empty config
        config_from_dict({})
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="not a valid JSON"):
        load_config(path)


@pytest.mark.parametrize(
    "section, key, value, message",
    [
        ("preprocess", "short_side", "512", "preprocess.short_side must be an integer"),
        ("preprocess", "mean", [0.5, "x", 0.5], "preprocess.mean must be a list of a number"),
        ("clip", "severance", "sideways", "unknown severance"),
        ("clip", "learned_pos_grid", 4.0, "clip.learned_pos_grid must be an integer"),
        ("clip", "bogus", 1, "unknown keys"),
        ("text", "prompt_length", True, "text.prompt_length must be an integer"),
    ],
)
def test_fields_are_type_checked(section, key, value, message):
    data = _tiny_dict()
    data[section][key] = value
    with pytest.raises(ConfigError, match=message):
        config_from_dict(data)


def test_family_section_is_checked_and_unknown_family_named():
    data = _tiny_dict()
    data["deop"]["proposals"]["num_queries"] = "6"
    with pytest.raises(ConfigError, match=r"deop.proposals.num_queries must be an integer"):
        config_from_dict(data)
    data = _tiny_dict()
    data["family"] = "maskclip"
    with pytest.raises(ConfigError, match="unknown model family 'maskclip'"):
        config_from_dict(data)
    data = _tiny_dict()
    data["format_version"] = 99
    with pytest.raises(ConfigError, match="upgrade the package"):
        config_from_dict(data)


def test_numbers_are_kept_as_their_types():
    data = _tiny_dict()
    data["deop"]["anchors"]["logit_scale"] = 50  # an int where a float belongs is fine
    config = config_from_dict(data)
    assert isinstance(config.family_config.anchors.logit_scale, float)
    assert isinstance(config.clip.learned_pos_blocks, tuple)


def test_replace_reaches_the_family_section_and_checks_values():
    config = preset_config("deop-tiny")
    changed = config.replace(**{"deop.anchors.pooling": "mask_average", "clip.severance": "none"})
    assert changed.family_config.anchors.pooling == "mask_average"
    assert config.family_config.anchors.pooling == "cal"  # the original is untouched
    with pytest.raises(ConfigError, match="unknown config field"):
        config.replace(**{"deop.anchors.nope": 1})
    with pytest.raises(ConfigError, match="must be an integer"):
        config.replace(**{"preprocess.short_side": "64"})
    with pytest.raises(ValueError, match="unknown pooling"):
        config.replace(**{"deop.anchors.pooling": "max"})


def test_building_a_model_does_not_mutate_the_callers_config():
    config = preset_config("deop-tiny")
    config.clip.model_cfg = {}
    config.clip.model_name = "ViT-B-16"
    config.clip.learned_pos_grid = 0
    before = config.to_dict()
    model = build_model(config)
    assert config.to_dict() == before  # the caller's config keeps its empty model_cfg
    assert model.config.clip.model_cfg["vision_cfg"]["width"] == 768  # the model's is resolved
