"""Tiny shapes-world CLIP: registration, shapes, severance, pretraining round trip."""

from __future__ import annotations

import json

import numpy as np
import open_clip
import pytest
import torch
from safetensors.torch import load_file

from onepass_ovs.toy import clip as tiny_clip
from onepass_ovs.toy import scenes


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """Two 2-step pretraining runs with the same seed: one crop step, one full-size step."""
    runs = []
    for name in ("a", "b"):
        out = tmp_path_factory.mktemp(f"tiny_clip_{name}")
        runs.append(
            tiny_clip.pretrain_tiny_clip(
                out, steps=2, batch_size=8, seed=3, full_res_fraction=0.5,
                full_res_batch_size=4, evaluate=False, progress=False,
            )
        )
    return runs


def test_config_is_registered_with_open_clip():
    name = tiny_clip.register_tiny_clip()
    assert name == "ovs-shapes-clip"
    assert name in open_clip.list_models()
    assert open_clip.get_model_config(name) == tiny_clip.TINY_CLIP_CONFIG
    assert tiny_clip.register_tiny_clip() == name  # idempotent
    model = open_clip.create_model(name)
    visual = model.visual
    assert isinstance(visual, open_clip.transformer.VisionTransformer)
    assert visual.pool_type == "avg" and visual.attn_pool is None
    assert visual.patch_size == (8, 8)
    assert model.context_length == tiny_clip.TINY_CLIP_CONFIG["text_cfg"]["context_length"]
    assert model.vocab_size == 49408


def test_forward_shapes():
    torch.manual_seed(0)
    model = tiny_clip.build_tiny_clip().eval()
    cfg = tiny_clip.TINY_CLIP_CONFIG
    size, dim = cfg["vision_cfg"]["image_size"], cfg["embed_dim"]
    grid = size // cfg["vision_cfg"]["patch_size"]
    tokenizer = open_clip.get_tokenizer("ovs-shapes-clip")
    images = scenes.render_scenes(0, 3, size=size).images
    pixels = tiny_clip.images_to_tensor(images, model)
    assert pixels.shape == (3, 3, size, size)
    with torch.no_grad():
        image_features = model.encode_image(pixels, normalize=True)
        text = tokenizer(["a red circle", "a photo of a blue star and a green cross."])
        assert text.shape == (2, cfg["text_cfg"]["context_length"])
        text_features = model.encode_text(text, normalize=True)
    assert image_features.shape == (3, dim) and text_features.shape == (2, dim)
    dense = tiny_clip.patch_features(model, pixels)
    assert dense.shape == (3, grid, grid, dim)
    torch.testing.assert_close(dense.norm(dim=-1), torch.ones(3, grid, grid))
    classes = tiny_clip.encode_class_prompts(model, tokenizer, scenes.CLASS_NAMES[1:])
    assert classes.shape == (30, dim)


def test_severed_last_block_keeps_patch_features_local():
    torch.manual_seed(0)
    model = tiny_clip.build_tiny_clip().eval()
    # With a single block left, severing its attention makes each token a function of its
    # own patch only; with attention, a change in one patch reaches every token.
    model.visual.transformer.resblocks = model.visual.transformer.resblocks[:1]
    size = tiny_clip.TINY_CLIP_CONFIG["vision_cfg"]["image_size"]
    pixels = torch.randn(1, 3, size, size)
    changed = pixels.clone()
    changed[..., :8, :8] += 1.0  # the top-left patch only
    for severed in (True, False):
        delta = (
            tiny_clip.patch_features(model, changed, severed)
            - tiny_clip.patch_features(model, pixels, severed)
        ).abs().amax(dim=-1)[0]
        assert delta[0, 0] > 1e-3
        others = delta.flatten()[1:]
        if severed:
            assert others.max() == 0
        else:
            assert others.min() > 0


def test_pretraining_writes_open_clip_folder_that_round_trips(pretrained):
    result = pretrained[0]
    folder = result.output_dir
    assert sorted(p.name for p in folder.iterdir()) == [
        "open_clip_config.json", "open_clip_model.safetensors",
    ]
    config = json.loads((folder / "open_clip_config.json").read_text())
    assert config["model_cfg"] == tiny_clip.TINY_CLIP_CONFIG
    assert config["preprocess_cfg"]["mean"] == list(open_clip.OPENAI_DATASET_MEAN)
    assert config["onepass_ovs"]["recipe"]["steps"] == 2
    assert config["onepass_ovs"]["recipe"]["crop_steps"] == 1

    loaded = open_clip.create_model(f"local-dir:{folder}").eval()
    tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")
    size = tiny_clip.TINY_CLIP_CONFIG["vision_cfg"]["image_size"]
    pixels = tiny_clip.images_to_tensor(scenes.render_scenes(1, 2, size=size).images, loaded)
    text = tokenizer(["a photo of a red star.", "a blue circle and a green cross"])
    with torch.no_grad():
        expected = result.model(pixels, text)
        actual = loaded(pixels, text)
    for a, b in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)

    # Training moved the weights away from the seed's initialisation.
    torch.manual_seed(3)
    initial = tiny_clip.build_tiny_clip().state_dict()
    trained = load_file(str(folder / "open_clip_model.safetensors"))
    assert not torch.equal(initial["visual.proj"], trained["visual.proj"])


def test_pretraining_is_deterministic(pretrained):
    first, second = (
        load_file(str(r.output_dir / "open_clip_model.safetensors")) for r in pretrained
    )
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key


def test_load_at_another_resolution_resizes_positions(pretrained):
    folder = pretrained[0].output_dir
    assert tiny_clip.load_tiny_clip(folder).visual.grid_size == (16, 16)
    model = tiny_clip.load_tiny_clip(folder, image_size=64)
    assert model.visual.grid_size == (8, 8)
    assert model.visual.positional_embedding.shape[0] == 8 * 8 + 1
    pixels = tiny_clip.images_to_tensor(scenes.render_scenes(2, 1).images, model)
    assert pixels.shape[-1] == 64
    assert tiny_clip.patch_features(model, pixels).shape[1:3] == (8, 8)


def test_window_encoding_matches_open_clip_forward():
    torch.manual_seed(0)
    model = tiny_clip.build_tiny_clip().eval()
    size = model.visual.image_size[0]
    pixels = torch.randn(2, 3, size, size)
    with torch.no_grad():
        full = tiny_clip._encode_image_windows(model, pixels, torch.zeros(2, 2, dtype=torch.long))
        torch.testing.assert_close(full, model.encode_image(pixels))
        # A crop at a window sees exactly the positions of that part of the full grid.
        crop = pixels[..., 16:48, 40:72]  # token rows 2..5, cols 5..8
        offsets = torch.tensor([[2, 5], [2, 5]])
        windowed = tiny_clip._encode_image_windows(model, crop, offsets)
        visual = model.visual
        grid = visual.positional_embedding[1:].reshape(16, 16, -1)
        table = torch.cat([visual.positional_embedding[:1], grid[2:6, 5:9].reshape(16, -1)])
        visual.positional_embedding = torch.nn.Parameter(table)
        visual.grid_size, visual.image_size = (4, 4), (32, 32)
        torch.testing.assert_close(windowed, model.encode_image(crop))


def test_confusable_groups_differ_only_in_shapes_colours_or_binding():
    rng = np.random.default_rng(0)
    for num_objects in (1, 2, 3, 4):
        for _ in range(20):
            group = tiny_clip._confusable_group(rng, 4, num_objects)
            assert len(group) == 4
            assert len({frozenset(members) for members in group}) == 4
            first_colours = sorted(n.split(" ")[0] for n in group[0])
            first_shapes = sorted(n.split(" ")[1] for n in group[0])
            for members in group:
                assert len(set(members)) == num_objects
                colours = sorted(n.split(" ")[0] for n in members)
                shapes = sorted(n.split(" ")[1] for n in members)
                assert colours == first_colours or shapes == first_shapes


def test_evaluation_reports_fractions(pretrained):
    metrics = tiny_clip.evaluate_tiny_clip(
        pretrained[0].model, scenes_per_class=1, num_region_scenes=4, scene_size=64,
    )
    expected_keys = {
        f"{kind}_{split}"
        for kind in ("zero_shot", "region", "region_severed")
        for split in ("seen", "unseen")
    }
    assert set(metrics) == expected_keys
    assert all(0.0 <= v <= 1.0 for v in metrics.values())


def test_cli_runs_a_short_pretraining(tmp_path, capsys):
    tiny_clip.main([
        "--output", str(tmp_path / "cli"), "--steps", "1", "--batch-size", "4", "--no-eval",
    ])
    printed = json.loads(capsys.readouterr().out)
    assert printed["output_dir"] == str(tmp_path / "cli")
    assert np.isfinite(printed["final_loss"])
    stored = json.loads((tmp_path / "cli" / "open_clip_config.json").read_text())
    assert stored["onepass_ovs"]["final_loss"] == printed["final_loss"]
    assert (tmp_path / "cli" / "open_clip_model.safetensors").is_file()


def test_fp16_storage_loads_through_open_clip(pretrained, tmp_path):
    result = pretrained[0]
    folder = tiny_clip.save_open_clip_folder(
        result.model, tiny_clip.TINY_CLIP_CONFIG, tmp_path / "fp16", dtype=torch.float16
    )
    stored = load_file(str(folder / "open_clip_model.safetensors"))
    assert stored["visual.proj"].dtype == torch.float16
    full = (result.output_dir / "open_clip_model.safetensors").stat().st_size
    assert (folder / "open_clip_model.safetensors").stat().st_size < 0.55 * full
    loaded = tiny_clip.load_tiny_clip(folder)
    assert loaded.visual.proj.dtype == torch.float32
    torch.testing.assert_close(
        loaded.visual.proj, result.model.visual.proj.half().float(), rtol=0, atol=0
    )
