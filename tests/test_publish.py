"""Model cards and push_to_hub (huggingface_hub mocked at the network edge: HfApi methods)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi

from onepass_ovs import Segmenter
from onepass_ovs.model_card import model_card, write_model_card

METRICS = {"ADE20K-150": {"mIoU": 29.13, "pAcc": 71.5}, "PC-59": {"mIoU": 57.0}}


def _front_matter(text: str) -> list[str]:
    lines = text.splitlines()
    assert lines[0] == "---"
    end = lines.index("---", 1)
    return lines[1:end]


def test_save_pretrained_with_a_card_loads_back_and_describes_the_model(tiny_segmenter, tmp_path):
    folder = tiny_segmenter.save_pretrained(
        tmp_path / "m", model_card=True, metrics=METRICS, repo_id="me/deop-tiny", license="apache-2.0"
    )
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    card = (folder / "README.md").read_text()
    header = _front_matter(card)
    assert "library_name: onepass-ovs" in header and "pipeline_tag: image-segmentation" in header
    assert "- deop" in header and "license: apache-2.0" in header
    assert "# deop-tiny" in card
    assert 'Segmenter.from_pretrained("hf-hub:me/deop-tiny")' in card
    assert '"a photo of a {}."' in card  # deop-tiny's single template
    assert "short side is 64 px" in card and "multiple of 32" in card
    assert "| ADE20K-150 | mIoU | 29.13 |" in card and "| PC-59 | mIoU | 57 |" in card
    # the card does not get in the way of loading
    again = Segmenter.from_pretrained(folder, device="cpu")
    for (name, a), b in zip(tiny_segmenter.model.state_dict().items(), again.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_card_without_metrics_says_so_and_bad_metrics_are_refused(tiny_segmenter, tmp_path):
    path = write_model_card(tmp_path, tiny_segmenter.config)
    card = path.read_text()
    assert "No metrics were reported" in card and "license:" not in card
    assert "path/to/this/folder" in card
    with pytest.raises(TypeError, match="mIoU"):
        model_card(tiny_segmenter.config, metrics={"mIoU": "high"})
    with pytest.raises(ValueError, match="not finite"):
        model_card(tiny_segmenter.config, metrics={"x": {"mIoU": float("nan")}})
    with pytest.raises(ValueError, match="model_card=True"):
        tiny_segmenter.save_pretrained(tmp_path / "x", metrics={"mIoU": 1.0})


def test_card_of_every_family_names_its_templates():
    from onepass_ovs.models.registry import preset_config

    card = model_card(preset_config("clip-vit-b16"))
    assert "80 ImageNet prompt templates" in card and "- clip" in card
    custom = preset_config("deop-tiny")
    custom.text.templates = ["a {} here.", "the {}.", "one {}.", "many {}."]
    assert '4 custom templates ("a {} here.", "the {}.", "one {}." and 1 more)' in model_card(custom)


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    """HfApi with its network methods replaced: records calls, keeps uploaded files."""
    calls = {"init": [], "create_repo": [], "create_branch": [], "upload_folder": []}
    uploaded = tmp_path / "uploaded"
    original_init = HfApi.__init__

    def init(self, *args, **kwargs):
        calls["init"].append(kwargs)
        original_init(self, *args, **kwargs)

    def create_repo(self, repo_id, **kwargs):
        calls["create_repo"].append((repo_id, kwargs))
        return f"https://huggingface.co/{repo_id}"

    def create_branch(self, repo_id, **kwargs):
        calls["create_branch"].append((repo_id, kwargs))

    def upload_folder(self, **kwargs):
        calls["upload_folder"].append(kwargs)
        shutil.copytree(kwargs["folder_path"], uploaded)  # the temp folder goes away
        return "commit-info"

    monkeypatch.setattr(HfApi, "__init__", init)
    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "create_branch", create_branch)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    return calls, uploaded


def test_push_to_hub_uploads_the_saved_model_and_card(tiny_segmenter, fake_hub):
    calls, uploaded = fake_hub
    info = tiny_segmenter.push_to_hub(
        "me/deop-tiny", private=True, token="hf_test", commit_message="first", metrics=METRICS
    )
    assert info == "commit-info"
    assert calls["init"][-1] == {"token": "hf_test"}
    [(repo, kwargs)] = calls["create_repo"]
    assert repo == "me/deop-tiny" and kwargs["private"] is True and kwargs["exist_ok"] is True
    assert calls["create_branch"] == []
    [upload] = calls["upload_folder"]
    assert upload["repo_id"] == "me/deop-tiny" and upload["commit_message"] == "first"
    assert upload["revision"] is None
    assert not Path(upload["folder_path"]).exists()  # the staging folder is cleaned up
    assert sorted(p.name for p in uploaded.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    card = (uploaded / "README.md").read_text()
    assert 'from_pretrained("hf-hub:me/deop-tiny")' in card and "| ADE20K-150 | mIoU | 29.13 |" in card
    # what was uploaded is the model, byte for byte what save_pretrained writes
    loaded = Segmenter.from_pretrained(uploaded, device="cpu")
    image = torch.rand(3, 40, 50)
    vocab = ["red circle", "blue square"]
    assert (loaded.segment(image, vocab).label_map == tiny_segmenter.segment(image, vocab).label_map).all()


def test_push_to_a_branch_creates_it(tiny_segmenter, fake_hub):
    calls, _ = fake_hub
    tiny_segmenter.push_to_hub("hf-hub:me/deop-tiny", revision="v2")
    [(repo, kwargs)] = calls["create_branch"]
    assert repo == "me/deop-tiny" and kwargs["branch"] == "v2"
    assert calls["upload_folder"][0]["revision"] == "v2"
    assert calls["create_repo"][0][1]["private"] is False


def test_push_refuses_a_bad_repo_id(tiny_segmenter, fake_hub):
    calls, _ = fake_hub
    with pytest.raises(ValueError, match="org/name"):
        tiny_segmenter.push_to_hub("no-slash")
    assert calls["upload_folder"] == []


def test_card_states_each_familys_synonym_rule():
    from onepass_ovs.models.registry import preset_config

    assert "the class takes the best of them" in model_card(preset_config("gkc-tiny"))
    assert "averaged into one class" in model_card(preset_config("sed-tiny"))
