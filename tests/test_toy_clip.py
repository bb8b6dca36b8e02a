"""Tiny shapes-world CLIP: registration, conv stem, shapes, severance, pretraining on the
engine (round trip, determinism, exact resume), evaluation, and models built on it."""

from __future__ import annotations

import json

import numpy as np
import open_clip
import pytest
import torch
from safetensors.torch import load_file

from onepass_ovs.models.towers import ConvStem
from onepass_ovs.toy import clip as tiny_clip
from onepass_ovs.toy import scenes

CLIP_FILES = ["open_clip_config.json", "open_clip_model.safetensors"]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """Two 2-step pretraining runs with the same seed: one crop step, one full-size step."""
    runs = []
    for name in ("a", "b"):
        out = tmp_path_factory.mktemp(f"tiny_clip_{name}")
        runs.append(
            tiny_clip.pretrain_tiny_clip(
                out, steps=2, batch_size=8, seed=3, full_res_fraction=0.5,
                full_res_batch_size=4, evaluate=False, progress=False, checkpoint_every=0,
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


def test_default_tiny_clip_has_the_conv_stem():
    model = tiny_clip.build_tiny_clip()
    stem = model.visual.conv1
    assert isinstance(stem, ConvStem)
    convs = [m for m in stem.convs if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.stride) for c in convs] == [
        (3, 32, (3, 3), (2, 2)), (32, 64, (3, 3), (2, 2)), (64, 128, (3, 3), (2, 2)),
    ]
    assert stem.proj.kernel_size == (1, 1) and stem.proj.out_channels == 128
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in stem.convs) == 3
    assert tiny_clip.tiny_clip_config()["conv_stem"] == [32, 64, 128]
    assert "conv_stem" not in tiny_clip.tiny_clip_config(None)
    assert not isinstance(tiny_clip.build_tiny_clip(tiny_clip.tiny_clip_config(None)).visual.conv1, ConvStem)


def test_forward_shapes():
    torch.manual_seed(0)
    model = tiny_clip.build_tiny_clip().eval()
    cfg = tiny_clip.TINY_CLIP_CONFIG
    size, dim = cfg["vision_cfg"]["image_size"], cfg["embed_dim"]
    grid = size // cfg["vision_cfg"]["patch_size"]
    tokenizer = open_clip.get_tokenizer(tiny_clip.register_tiny_clip())
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
    # the patchify ViT: a conv stem's receptive field crosses patch borders by design
    model = tiny_clip.build_tiny_clip(tiny_clip.tiny_clip_config(None)).eval()
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


def test_pretraining_writes_a_folder_that_round_trips_bit_exactly(pretrained):
    result = pretrained[0]
    folder = result.output_dir
    names = sorted(p.name for p in folder.iterdir())
    assert set(CLIP_FILES) <= set(names)
    assert {"config.json", "train_log.jsonl", "checkpoints"} <= set(names)  # the engine's run
    assert not list(folder.rglob("*.pt")) and not list(folder.rglob("*.bin"))
    config = json.loads((folder / "open_clip_config.json").read_text())
    assert config["model_cfg"] == tiny_clip.tiny_clip_config()
    assert config["model_cfg"]["conv_stem"] == [32, 64, 128]
    assert config["preprocess_cfg"]["mean"] == list(open_clip.OPENAI_DATASET_MEAN)
    assert config["onepass_ovs"]["recipe"]["steps"] == 2
    assert config["onepass_ovs"]["recipe"]["crop_steps"] == 1

    loaded = tiny_clip.load_tiny_clip(folder)
    assert isinstance(loaded.visual.conv1, ConvStem)
    a, b = result.model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # BatchNorm trained in train mode: its running statistics moved and travelled
    running = [k for k in a if k.endswith("running_mean")]
    assert len(running) == 3 and all(a[k].abs().sum() > 0 for k in running)
    tokenizer = tiny_clip._tokenizer(loaded)
    size = tiny_clip.TINY_CLIP_CONFIG["vision_cfg"]["image_size"]
    pixels = tiny_clip.images_to_tensor(scenes.render_scenes(1, 2, size=size).images, loaded)
    text = tokenizer(["a photo of a red star.", "a blue circle and a green cross"])
    with torch.no_grad():
        expected = result.model(pixels, text)
        actual = loaded(pixels, text)
    for x, y in zip(actual, expected, strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    # plain open_clip cannot build the stem and refuses the folder instead of dropping it
    with pytest.raises(TypeError):
        open_clip.create_model(f"local-dir:{folder}")

    # Training moved the weights away from the seed's initialisation.
    from onepass_ovs.training.sampling import seed_everything

    seed_everything(3)
    initial = tiny_clip.build_tiny_clip().state_dict()
    trained = load_file(str(folder / "open_clip_model.safetensors"))
    assert not torch.equal(initial["visual.proj"], trained["visual.proj"])
    assert not torch.equal(initial["visual.conv1.convs.0.weight"], trained["visual.conv1.convs.0.weight"])


def test_stem_batchnorm_uses_stored_statistics_after_pretraining(pretrained):
    model = tiny_clip.load_tiny_clip(pretrained[0].output_dir)
    pixels = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        evaluated = model.visual.conv1(pixels)
        model.train()  # e.g. inside a segmenter being trained
        assert not any(m.training for m in model.visual.conv1.convs if isinstance(m, torch.nn.BatchNorm2d))
        trained_mode = model.visual.conv1(pixels)
    torch.testing.assert_close(trained_mode, evaluated, rtol=0, atol=0)
    stats = model.visual.conv1.convs[1].running_mean.clone()
    with torch.no_grad():
        model.visual.conv1(pixels * 3)
    assert torch.equal(stats, model.visual.conv1.convs[1].running_mean)


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


@pytest.mark.parametrize("conv_stem", [tiny_clip.TINY_CLIP_CONV_STEM, None])
def test_window_encoding_matches_open_clip_forward(conv_stem):
    torch.manual_seed(0)
    model = tiny_clip.build_tiny_clip(tiny_clip.tiny_clip_config(conv_stem)).eval()
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


def test_evaluation_counts_hits_against_an_independent_reference():
    """A model whose image embedding is a fixed class's text embedding scores exactly the
    share of that class; evaluation scenes come from streams no training batch uses."""
    torch.manual_seed(0)
    model = tiny_clip.build_tiny_clip().eval()
    tokenizer = tiny_clip._tokenizer(model)
    names = [scenes.with_article(n) for n in scenes.CLASS_NAMES[1:]]
    text = tiny_clip.encode_class_prompts(model, tokenizer, names, "a photo of {}.")
    target = scenes.class_id("orange star") - 1  # unseen
    model.encode_image = lambda pixels, normalize=True: text[target].expand(len(pixels), -1)
    metrics = tiny_clip.evaluate_tiny_clip(
        model, tokenizer, scenes_per_class=2, num_region_scenes=2, scene_size=64,
    )
    assert metrics["zero_shot_seen"] == 0.0
    assert metrics["zero_shot_unseen"] == pytest.approx(1 / 6)
    assert tiny_clip.EVAL_STREAM != tiny_clip.TRAIN_STREAM


def test_cli_runs_a_short_pretraining(tmp_path, capsys):
    tiny_clip.main([
        "--output", str(tmp_path / "cli"), "--steps", "1", "--batch-size", "4", "--no-eval",
    ])
    printed = json.loads(capsys.readouterr().out)
    assert printed["output_dir"] == str(tmp_path / "cli")
    assert np.isfinite(printed["final_loss"])
    stored = json.loads((tmp_path / "cli" / "open_clip_config.json").read_text())
    assert stored["onepass_ovs"]["final_loss"] == printed["final_loss"]
    assert stored["model_cfg"]["conv_stem"] == [32, 64, 128]
    assert (tmp_path / "cli" / "open_clip_model.safetensors").is_file()
    assert (tmp_path / "cli" / "train_log.jsonl").is_file()


def test_fp16_storage_loads(pretrained, tmp_path):
    result = pretrained[0]
    folder = tiny_clip.save_open_clip_folder(
        result.model, tiny_clip.tiny_clip_config(), tmp_path / "fp16", dtype=torch.float16
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


# --------------------------------------------------------------------------------------
# Exact resume on the engine.


def _short_run(out, **overrides):
    kwargs = dict(
        steps=4, batch_size=8, seed=5, full_res_fraction=0.25, full_res_batch_size=4,
        single_object_warmup=0.5, evaluate=False, progress=False, checkpoint_every=2,
    )
    kwargs.update(overrides)
    return tiny_clip.pretrain_tiny_clip(out, **kwargs)


def test_pretraining_resumes_bit_exactly(tmp_path):
    """Steps 1-2, then 3-4 resumed from the step-2 checkpoint == steps 1-4 in one go."""
    import shutil

    whole = _short_run(tmp_path / "whole")
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(tmp_path / "whole" / "checkpoints", resumed_dir / "checkpoints")
    shutil.rmtree(resumed_dir / "checkpoints" / "step_00000004")
    assert [p.name for p in (resumed_dir / "checkpoints").iterdir()] == ["step_00000002"]
    resumed = _short_run(resumed_dir, resume="auto")
    a, b = whole.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # and the resumed half really trained: weights differ from the step-2 checkpoint
    step2 = load_file(str(resumed_dir / "checkpoints" / "step_00000002" / "model.safetensors"))
    assert not torch.equal(step2["visual.proj"], b["visual.proj"])
    log = [json.loads(line) for line in (resumed_dir / "train_log.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in log][-1] == 4


def test_a_fresh_run_refuses_a_folder_with_checkpoints(pretrained):
    with pytest.raises(FileExistsError):
        _short_run(pretrained[0].output_dir, steps=2, checkpoint_every=0)


# --------------------------------------------------------------------------------------
# Models built on the conv-stem tiny CLIP.


def test_deop_on_the_conv_stem_clip_round_trips_and_slides(pretrained, tmp_path):
    from onepass_ovs import Segmenter
    from onepass_ovs.toy.build import demo_config

    folder = pretrained[0].output_dir
    clip = tiny_clip.load_tiny_clip(folder)
    clip_cfg = json.loads((folder / "open_clip_config.json").read_text())["model_cfg"]
    seg = Segmenter.from_config(demo_config(clip_cfg), device="cpu", seed=0)
    seg.model.load_clip_weights(clip)
    stem = seg.model.clip_visual.conv1
    assert isinstance(stem, ConvStem)
    for key, value in clip.visual.conv1.state_dict().items():
        assert torch.equal(stem.state_dict()[key], value), key
    seg.save_pretrained(tmp_path / "deop")
    saved = json.loads((tmp_path / "deop" / "config.json").read_text())
    assert saved["clip"]["conv_stem"] == [32, 64, 128]
    loaded = Segmenter.from_pretrained(tmp_path / "deop", device="cpu")
    a, b = seg.model.state_dict(), loaded.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    image = scenes.render_scene(11, 160).image
    vocab = list(scenes.CLASS_NAMES)
    one = loaded.segment(image, vocab, sliding_window=False)
    np.testing.assert_array_equal(one.label_map, seg.segment(image, vocab, sliding_window=False).label_map)
    fits = loaded.segment(image, vocab, sliding_window=4096)
    np.testing.assert_allclose(fits.probs, one.probs, atol=1e-6)
    slid = loaded.segment(image, vocab, size="original", sliding_window=(96, 64))
    assert slid.label_map.shape == (160, 160)
    assert np.isfinite(slid.probs).all()

    # the clip family reads the same CLIP from the DeOP folder and from the CLIP folder
    for source in (tmp_path / "deop", folder):
        free = Segmenter.from_clip(str(source), severance="none", templates="single", device="cpu")
        free_stem = free.model.clip_visual.conv1
        assert isinstance(free_stem, ConvStem)
        for key, value in clip.visual.conv1.state_dict().items():
            assert torch.equal(free_stem.state_dict()[key], value), (source, key)
        assert free.segment(image, vocab).label_map.shape == (160, 160)
