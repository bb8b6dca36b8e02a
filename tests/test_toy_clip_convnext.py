"""The shapes world's tiny ConvNeXt CLIP (SED's backbone): architecture (stride 16),
pretraining on the ViT's engine and data, the saved folder loaded by ``load_tiny_clip``,
by ``create_clip`` and by SED, its dense embedding, and its evaluation."""

from __future__ import annotations

import json

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F

from onepass_ovs.config import ClipConfig
from onepass_ovs.models.towers import (
    DenseConvNeXt,
    create_clip,
    load_open_clip_weights,
    tower_kind,
)
from onepass_ovs.toy import clip as tiny_clip
from onepass_ovs.toy import scenes


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A 2-step ConvNeXt pretraining run: one 64 px crop step, one full-size step."""
    out = tmp_path_factory.mktemp("convnext_clip")
    return tiny_clip.pretrain_tiny_clip(
        out, steps=2, batch_size=8, seed=5, full_res_fraction=0.5, full_res_batch_size=4,
        model_cfg=tiny_clip.tiny_convnext_clip_config(), evaluate=False, progress=False,
        checkpoint_every=1,
    )


def _pixels(model, n=2, size=128):
    return tiny_clip.images_to_tensor(scenes.render_scenes(7, n, size=size).images, model)


def test_the_convnext_clip_runs_its_four_stages_at_strides_2_to_16():
    cfg = tiny_clip.tiny_convnext_clip_config()
    model = tiny_clip.build_tiny_clip(cfg).eval()
    assert tiny_clip.is_convnext_clip(model)
    assert tower_kind(ClipConfig(model_name="x", model_cfg=cfg)) == "timm-convnext"
    trunk = model.visual.trunk
    stem = trunk.stem[0]
    assert stem.kernel_size == (2, 2) and stem.stride == (2, 2) and stem.out_channels == 32
    assert isinstance(trunk.stages[0].downsample, torch.nn.Identity)
    assert [len(stage.blocks) for stage in trunk.stages] == [1, 1, 2, 1]
    # measured feature maps, not the trunk's bookkeeping
    x = torch.randn(1, 3, 128, 128)
    shapes = []
    with torch.no_grad():
        x = trunk.stem(x)
        for stage in trunk.stages:
            x = stage(x)
            shapes.append(tuple(x.shape[1:]))
    assert shapes == [(32, 64, 64), (64, 32, 32), (128, 16, 16), (256, 8, 8)]
    dense = DenseConvNeXt(model.visual)
    assert dense.stage_strides == [2, 4, 8, 16] and dense.stride == 16
    assert dense.stage_channels == [32, 64, 128, 256]
    assert dense.grid_size(128, 96) == (8, 6)
    with pytest.raises(ValueError, match="multiple of 16"):
        dense.grid_size(120, 128)
    assert model.visual.head.proj.in_features == 256 and model.visual.head.proj.out_features == 128
    vision_params = sum(p.numel() for p in model.visual.parameters())
    assert 0.5e6 < vision_params < 2e6
    # the text tower is the ViT tiny CLIP's
    assert cfg["text_cfg"] == tiny_clip.TINY_CLIP_CONFIG["text_cfg"]
    # fully convolutional: 64 px crops and 128 px scenes alike
    with torch.no_grad():
        assert model.encode_image(torch.randn(2, 3, 64, 64)).shape == (2, 128)
        assert model.encode_image(torch.randn(2, 3, 128, 128)).shape == (2, 128)


def test_bad_timm_extensions_are_refused():
    cfg = tiny_clip.tiny_convnext_clip_config()
    cfg["vision_cfg"]["timm_model_kwargs"]["patch_size"] = 4  # no first-stage downsample to drop
    with pytest.raises(ValueError, match="timm_first_stage_downsample"):
        create_clip(ClipConfig(model_name="x", model_cfg=cfg))
    cfg = tiny_clip.tiny_convnext_clip_config()
    cfg["vision_cfg"]["timm_model_kwargs"]["no_such_argument"] = 1
    with pytest.raises(ValueError, match="no_such_argument"):
        create_clip(ClipConfig(model_name="x", model_cfg=cfg))
    cfg = tiny_clip.tiny_convnext_clip_config()
    cfg["vision_cfg"]["timm_proj"] = "none"
    with pytest.raises(ValueError, match="timm_proj"):
        create_clip(ClipConfig(model_name="x", model_cfg=cfg))


def test_crops_are_fed_as_they_are():
    model = tiny_clip.build_tiny_clip(tiny_clip.tiny_convnext_clip_config())
    plan = {
        "seed": 0, "full_size": 128, "patch": None, "crop_size": 64, "crop_steps": 1,
        "batch_size": 4, "full_res_batch_size": 2, "group_size": 2,
        "single_object_fraction": 0.5, "single_object_steps": 1,
        "mean": list(model.visual.image_mean), "std": list(model.visual.image_std),
    }
    steps = tiny_clip._PretrainSteps(
        steps=2, order_seed=0, plan=plan, tokenizer=tiny_clip._tokenizer(model)
    )
    items = {steps.step_of_index[i]: steps[i] for i in range(2)}
    assert items[0]["pixels"].shape == (4, 3, 64, 64) and items[0]["offsets"].shape == (0, 2)
    assert items[1]["pixels"].shape == (2, 3, 128, 128) and items[1]["offsets"].shape == (0, 2)


def test_pretrained_folder_loads_through_load_tiny_clip_and_create_clip(pretrained):
    folder = pretrained.output_dir
    assert (folder / "checkpoints").is_dir() and list((folder / "checkpoints").iterdir())
    config = json.loads((folder / "open_clip_config.json").read_text())
    assert config["model_cfg"] == tiny_clip.tiny_convnext_clip_config()
    recipe = config["onepass_ovs"]["recipe"]
    assert recipe["tower"] == "convnext" and recipe["crop_steps"] == 1
    assert np.isfinite(pretrained.final_loss)

    loaded = tiny_clip.load_tiny_clip(folder)
    a, b = pretrained.model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # the library's factory, as the sed family builds its CLIP from a ModelConfig
    library = create_clip(ClipConfig(model_name="shapes-convnext", model_cfg=config["model_cfg"]))
    load_open_clip_weights(library, folder / "open_clip_model.safetensors")
    library.eval()

    pixels = _pixels(loaded)
    tokens = tiny_clip._tokenizer(loaded)(["a photo of a red star.", "a blue circle"])
    with torch.no_grad():
        expected = pretrained.model(pixels, tokens)
        for model in (loaded, library):
            for x, y in zip(model(pixels, tokens), expected, strict=True):
                torch.testing.assert_close(x, y, rtol=0, atol=0)
    # training moved the trunk away from its initialisation
    from onepass_ovs.training.sampling import seed_everything

    seed_everything(5)
    initial = tiny_clip.build_tiny_clip(tiny_clip.tiny_convnext_clip_config()).state_dict()
    key = "visual.trunk.stem.0.weight"
    assert not torch.equal(initial[key], a[key])
    # plain open_clip cannot build the extensions and refuses the folder
    with pytest.raises(TypeError):
        open_clip.create_model(f"local-dir:{folder}")


def test_dense_embedding_is_the_head_applied_per_pixel(pretrained):
    """Reference by hand: LayerNorm over channels at each pixel, then the projection.
    The head's LayerNorm comes before the projection, so averaging the dense embeddings
    is *not* encode_image; on a 1 x 1 grid (a 16 px image) the two coincide."""
    model = pretrained.model
    dense = tiny_clip.dense_tower(model)
    norm, proj = model.visual.trunk.head.norm, model.visual.head.proj
    pixels = _pixels(model)
    with torch.no_grad():
        res5 = dense.stages(pixels)[-1]  # (B, 256, 8, 8)
        per_pixel = F.layer_norm(
            res5.permute(0, 2, 3, 1), (res5.shape[1],), norm.weight, norm.bias, norm.eps
        ) @ proj.weight.T
        expected = F.normalize(per_pixel, dim=-1)
        features = tiny_clip.patch_features(model, pixels)
        torch.testing.assert_close(features, expected, rtol=1e-5, atol=1e-5)

        pooled = F.layer_norm(res5.mean((2, 3)), (res5.shape[1],), norm.weight, norm.bias, norm.eps)
        torch.testing.assert_close(model.encode_image(pixels), pooled @ proj.weight.T)
        averaged = F.normalize(per_pixel.mean((1, 2)), dim=-1)
        assert (averaged - model.encode_image(pixels, normalize=True)).abs().max() > 1e-3

        small = torch.randn(3, 3, 16, 16)
        one, grid = dense(small)
        assert grid == (1, 1)
        torch.testing.assert_close(one[:, 0], model.encode_image(small, normalize=True))
    with pytest.raises(ValueError, match="sever"):
        tiny_clip.patch_features(model, pixels, sever_last_block=True)


def test_sed_loads_the_convnext_clip_with_its_cost_map_at_stride_16(pretrained):
    from onepass_ovs.models.sed import SED, sed_tiny

    config = sed_tiny()
    model_cfg = json.loads((pretrained.output_dir / "open_clip_config.json").read_text())["model_cfg"]
    config.clip.model_name = "shapes-convnext"
    config.clip.model_cfg = model_cfg
    sed = SED(config).eval()
    clip = tiny_clip.load_tiny_clip(pretrained.output_dir)
    sed.load_clip_weights(clip)
    images = torch.from_numpy(scenes.render_scenes(7, 2, size=128).images).permute(0, 3, 1, 2)
    images = images.float() / 255
    with torch.no_grad():
        encoding = sed.encode_image(images)
        expected = tiny_clip.patch_features(clip, tiny_clip.images_to_tensor(
            scenes.render_scenes(7, 2, size=128).images, clip
        ))
    assert encoding["embedding"].shape == (2, 128, 8, 8)
    # SED normalises with the CLIP's mean/std itself: the same dense embedding
    torch.testing.assert_close(encoding["embedding"].permute(0, 2, 3, 1), expected, rtol=1e-4, atol=1e-4)
    assert [encoding[f"guidance_{i}"].shape[-1] for i in range(3)] == [16, 32, 64]


def test_evaluation_reports_zero_shot_and_dense_region_accuracy(pretrained):
    metrics = tiny_clip.evaluate_tiny_clip(
        pretrained.model, scenes_per_class=1, num_region_scenes=4, scene_size=64,
    )
    assert set(metrics) == {
        f"{kind}_{split}" for kind in ("zero_shot", "region") for split in ("seen", "unseen")
    }
    assert all(0.0 <= v <= 1.0 for v in metrics.values())


def test_cli_pretrains_the_convnext(tmp_path, capsys):
    tiny_clip.main([
        "--tower", "convnext", "--output", str(tmp_path / "cli"), "--steps", "1",
        "--batch-size", "4", "--no-eval", "--no-progress",
    ])
    printed = json.loads(capsys.readouterr().out)
    assert np.isfinite(printed["final_loss"])
    stored = json.loads((tmp_path / "cli" / "open_clip_config.json").read_text())
    assert stored["model_cfg"] == tiny_clip.tiny_convnext_clip_config()
    with pytest.raises(SystemExit):
        tiny_clip.main(["--tower", "convnext", "--pool", "avg", "--output", str(tmp_path / "x")])
