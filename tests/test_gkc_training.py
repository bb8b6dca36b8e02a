"""GKC training: synonym sources, offline scoring and teacher caches, the per-load draw,
the mask losses, and the stage end to end (learning, resume, ablation flags, CLI).

Everything runs on CPU with ``gkc-tiny`` and 64 x 64 synthetic rectangles
(``_stage_helpers.write_rectangles``); the CLIPs are small random open_clip models.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import _stage_helpers as helpers
from onepass_ovs import Segmenter
from onepass_ovs.config import CLIP_MEAN, CLIP_STD, ClipConfig
from onepass_ovs.data import DatasetError, FolderDataset, semantic_to_instances
from onepass_ovs.data.synonyms import (
    SHAPES_WORLD_COLOUR_SYNONYMS,
    SHAPES_WORLD_SHAPE_SYNONYMS,
    build_synonym_sets,
    find_wordnet_dir,
    read_synonym_json,
    shapes_world_synonyms,
    wordnet_synonyms,
)
from onepass_ovs.models.gkc import gkc_tiny
from onepass_ovs.models.towers import TINY_CLIP_CFG, create_clip, create_tokenizer
from onepass_ovs.toy.scenes import CLASS_NAMES
from onepass_ovs.training.gkc_offline import (
    FrozenClip,
    load_or_embed_regions,
    load_or_score_synonyms,
)
from onepass_ovs.training.stages import STAGE_DEFAULTS, default_config, train_gkc
from onepass_ovs.training.stages import gkc as gkc_stage

RECT_SYNONYMS = {
    "red box": ["crimson box", "scarlet box", "ruby box"],
    "green box": ["emerald box"],
    "blue box": ["azure box", "navy box"],
    "background": ["backdrop"],
}


one_thread = helpers.one_thread  # autouse: one torch thread per test


data_root = helpers.rectangles_fixture(n=8)


def tiny_open_clip(resnet: bool = False, seed: int = 0):
    """A random open_clip CLIP: the tiny ViT, or gkc-tiny's ResNet (which has BatchNorm)."""
    cfg = copy.deepcopy(gkc_tiny().clip.model_cfg if resnet else TINY_CLIP_CFG)
    torch.manual_seed(seed)
    model = create_clip(ClipConfig(model_name="tiny", model_cfg=cfg))
    if resnet:  # non-trivial BatchNorm statistics, so train and eval mode differ
        with torch.no_grad():
            for module in model.visual.modules():
                if isinstance(module, torch.nn.BatchNorm2d):
                    module.running_mean.uniform_(-0.5, 0.5)
                    module.running_var.uniform_(0.5, 2.0)
                    module.weight.uniform_(0.5, 1.5)
    return model, cfg


@pytest.fixture(scope="module")
def tiny_clip():
    model, cfg = tiny_open_clip()
    return FrozenClip.from_open_clip(model, cfg, name="tiny-vit")


def quick_config(output_dir, **overrides):
    values = dict(
        steps=3, batch_size=2, lr=1e-3, num_workers=0, log_every=1, progress_bar=False,
        checkpoint_every=0, output_dir=str(output_dir),
    )  # fmt: skip
    values.update(overrides)
    return default_config("gkc", **values)


def read_log(output_dir) -> list[dict]:
    path = Path(output_dir) / "training" / "train_log.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


# -- synonym sources ----------------------------------------------------------------------------


def test_synonym_json_is_read_and_checked(tmp_path):
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"sofa": [" couch ", "settee"], "cat": []}))
    assert read_synonym_json(good) == {"sofa": ["couch", "settee"], "cat": []}
    for name, payload, match in [
        ("list.json", "[1, 2]", "expected an object"),
        ("value.json", '{"sofa": "couch"}', "list of strings"),
        ("comma.json", '{"sofa": ["couch, settee"]}', "comma"),
        ("empty.json", '{"sofa": [""]}', "empty synonym"),
        ("broken.json", '{"sofa": [', "cannot read"),
    ]:
        path = tmp_path / name
        path.write_text(payload)
        with pytest.raises(DatasetError, match=match):
            read_synonym_json(path)
    with pytest.raises(DatasetError, match="not found"):
        read_synonym_json(tmp_path / "missing.json")


def test_synonym_sets_merge_dedupe_and_stay_disjoint():
    classes = ["background", "sofa, couch", "chair", "red box"]
    sources = [
        {"SOFA": ["Settee", "couch", "chair", "lounge"], "red box": ["crimson box"]},
        {"couch": ["settee", "divan"], "chair": ["seat", "lounge"]},
    ]
    sets = build_synonym_sets(classes, sources)
    # own names first; a source found by the full string or any own name, case-insensitive;
    # duplicates (any case) dropped
    assert sets[1] == ["sofa", "couch", "Settee", "lounge", "divan"]
    # "chair" is another class's own name; "lounge" was claimed by the earlier class
    assert sets[2] == ["chair", "seat"]
    assert sets[3] == ["red box", "crimson box"]
    assert sets[0] == ["background"]
    flat = [n.lower() for s in sets for n in s]
    assert len(flat) == len(set(flat))
    with pytest.raises(ValueError, match="comma"):
        build_synonym_sets(["cat"], [{"cat": ["kitty, puss"]}])


def test_shapes_world_synonyms_cover_every_class():
    table = shapes_world_synonyms(list(CLASS_NAMES))
    assert set(table) == set(CLASS_NAMES)
    for name, synonyms in table.items():
        assert synonyms[0] == name
        if name == "background":
            continue
        colour, shape = name.split(" ")
        expected = {f"{c} {s}" for c in SHAPES_WORLD_COLOUR_SYNONYMS[colour]
                    for s in SHAPES_WORLD_SHAPE_SYNONYMS[shape]}  # fmt: skip
        assert set(synonyms) == expected
    assert "crimson ring" in table["red circle"] and "scarlet disc" in table["red circle"]
    assert "green plus sign" in table["green cross"] and "blue box" in table["blue square"]
    # no synonym is shared, so the merged sets keep every one of them
    sets = build_synonym_sets(list(CLASS_NAMES), [table])
    assert [len(s) for s in sets] == [len(table[n]) for n in CLASS_NAMES]
    assert shapes_world_synonyms(["teapot", "red teapot"]) == {}


def _direct_wordnet_nouns(folder: Path, word: str) -> list[str]:
    """Noun lemmas of ``word`` read straight from WordNet's index.noun / data.noun
    (wndb(5WN)): the index line lists synset offsets; each data line lists its words."""
    key = word.lower().replace(" ", "_")
    offsets = []
    with open(folder / "index.noun", encoding="utf-8") as handle:
        for line in handle:
            if line.startswith(key + " "):
                fields = line.split()
                synsets, pointers = int(fields[2]), int(fields[3])
                offsets = [int(o) for o in fields[4 + pointers + 2 : 4 + pointers + 2 + synsets]]
                break
    lemmas = [word]
    with open(folder / "data.noun", "rb") as handle:
        for offset in offsets:
            handle.seek(offset)
            fields = handle.readline().decode("utf-8").split()
            count = int(fields[3], 16)
            lemmas += [fields[4 + 2 * i].replace("_", " ") for i in range(count)]
    seen, out = set(), []
    for lemma in lemmas:
        if lemma.lower() not in seen:
            seen.add(lemma.lower())
            out.append(lemma)
    return out


def test_wordnet_noun_lemmas_match_the_database(tmp_path):
    pytest.importorskip("nltk")
    folder = find_wordnet_dir()
    if folder is None:
        pytest.skip("no WordNet 3.0 database (Debian: apt-get install wordnet-base)")
    words = ["sofa", "traffic light", "circle", "zzqx"]
    table = wordnet_synonyms(words, folder, cache_dir=tmp_path)
    for word in words:
        assert table[word] == _direct_wordnet_nouns(folder, word)
    assert {"couch", "lounge"} <= set(table["sofa"])
    assert "traffic signal" in table["traffic light"]
    assert table["zzqx"] == ["zzqx"]
    with pytest.raises(FileNotFoundError, match="WordNet"):
        wordnet_synonyms(["sofa"], tmp_path / "nowhere")


# -- offline scoring and the teacher ------------------------------------------------------------


def _box(mask: torch.Tensor) -> tuple[int, int, int, int]:
    rows = torch.where(mask.any(1))[0]
    cols = torch.where(mask.any(0))[0]
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def test_synonym_scores_match_clip_and_are_cached(data_root, tmp_path):
    dataset = FolderDataset(data_root)
    model, cfg = tiny_open_clip(seed=3)
    clip = FrozenClip.from_open_clip(model, cfg, name="tiny-vit-3")
    by_id = {1: ["red box", "crimson box", "scarlet box"], 2: ["green box"]}
    path = tmp_path / "scores.json"
    scores = load_or_score_synonyms(path, dataset, by_id, clip)

    # the reference: open_clip's own encode_image / encode_text on the box crop
    tokenizer = create_tokenizer(cfg)
    text = F.normalize(model.encode_text(tokenizer([f"a photo of {s}" for s in by_id[1]])), dim=-1)
    checked = 0
    for index in range(len(dataset)):
        image, label = dataset.load(index)
        present = set(torch.unique(label).tolist())
        stem = dataset.stem(index)
        assert set(scores[stem]) == present & {1, 2}
        if 2 in present:
            assert scores[stem][2] == [1.0]
        if 1 not in present:
            continue
        y0, y1, x0, x1 = _box(label == 1)
        crop = image[:, y0:y1, x0:x1].float()[None] / 255
        crop = F.interpolate(
            crop, size=(64, 64), mode="bilinear", align_corners=False, antialias=True
        )
        crop = (crop - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(
            1, 3, 1, 1
        )
        with torch.no_grad():
            emb = F.normalize(model.encode_image(crop), dim=-1)[0]
            expected = (model.logit_scale.exp() * text @ emb).double().softmax(0)
        assert torch.allclose(
            torch.tensor(scores[stem][1], dtype=torch.float64), expected, atol=1e-5
        )
        assert math.isclose(sum(scores[stem][1]), 1.0, abs_tol=1e-9)
        checked += 1
    assert checked >= 2

    # cached: read back exactly, without a CLIP
    assert load_or_score_synonyms(path, dataset, by_id, None) == scores
    # other synonyms invalidate the cache: rescoring needs a CLIP
    with pytest.raises(ValueError, match="no valid synonym scores"):
        load_or_score_synonyms(path, dataset, {1: ["red box", "ruby box"]}, None)
    # one name per class needs no CLIP at all
    assert load_or_score_synonyms(tmp_path / "one.json", dataset, {2: ["green box"]}, None)


def test_teacher_embeddings_are_eval_mode_region_crops_and_cached(data_root, tmp_path):
    dataset = FolderDataset(data_root, unseen=["yellow box"])
    model, cfg = tiny_open_clip(resnet=True)
    teacher = FrozenClip.from_open_clip(model, cfg, name="tiny-rn")
    teacher.train()  # the engine calls train(); a teacher stays in eval mode
    assert not any(m.training for m in teacher.modules())
    assert not any(p.requires_grad for p in teacher.parameters())

    path = tmp_path / "teacher.safetensors"
    embeddings, keys = load_or_embed_regions(path, dataset, teacher)
    expected_keys = []
    for index in range(len(dataset)):
        _, label = dataset.load(index)
        classes, _ = semantic_to_instances(label)
        expected_keys += [(dataset.stem(index), int(c)) for c in classes]
    assert keys == expected_keys and 4 not in {c for _, c in keys}  # unseen: no region

    # the reference for one region: grey outside the mask, box crop, resize, CLIP norm,
    # open_clip's encode_image in eval mode, one crop at a time
    stem, class_id = keys[1]
    index = [dataset.stem(i) for i in range(len(dataset))].index(stem)
    image, label = dataset.load(index)
    mask = label == class_id
    y0, y1, x0, x1 = _box(mask)
    grey = torch.where(mask, image.float() / 255, torch.tensor(128 / 255))[:, y0:y1, x0:x1]
    crop = F.interpolate(
        grey[None], size=(64, 64), mode="bilinear", align_corners=False, antialias=True
    )
    crop = (crop - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(
        1, 3, 1, 1
    )
    model.eval()
    with torch.no_grad():
        reference = F.normalize(model.encode_image(crop), dim=-1)[0]
        model.train()  # what the authors' teacher does: batch statistics
        train_mode = F.normalize(model.encode_image(torch.cat([crop, crop.flip(-1)])), dim=-1)[0]
        model.eval()
    assert torch.allclose(embeddings[1], reference, atol=1e-5)
    assert not torch.allclose(embeddings[1], train_mode, atol=1e-3)

    cached, cached_keys = load_or_embed_regions(path, dataset, None)
    assert torch.equal(cached, embeddings) and cached_keys == keys
    other = FrozenClip.from_open_clip(*tiny_open_clip(resnet=True, seed=1), name="other")
    recomputed, _ = load_or_embed_regions(path, dataset, other)  # another teacher: recomputed
    assert not torch.allclose(recomputed, embeddings)


def test_in_place_region_view_keeps_scale_and_invalidates_box_caches(data_root, tmp_path):
    dataset = FolderDataset(data_root)
    model, cfg = tiny_open_clip(seed=5)
    box = FrozenClip.from_open_clip(model, cfg, name="tiny")
    in_place = FrozenClip.from_open_clip(model, cfg, name="tiny", region_view="in_place")
    with pytest.raises(ValueError, match="region_view"):
        FrozenClip.from_open_clip(model, cfg, name="tiny", region_view="boxes")

    # the reference: the whole 64 px image, grey outside the mask, nothing cropped or
    # resized, open_clip's encode_image
    image, label = dataset.load(0)
    class_id = int(torch.unique(label)[-1])
    mask = label == class_id
    grey = torch.where(mask, image.float() / 255, torch.tensor(128 / 255))[None]
    norm = (grey - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    for greyed in (True, False):  # an in-place view always greys the rest
        inputs = in_place.region_inputs(image.float() / 255, mask[None], greyed=greyed)
        assert torch.allclose(inputs, norm, atol=1e-6)
    with torch.no_grad():
        reference = F.normalize(model.encode_image(norm), dim=-1)[0]

    path = tmp_path / "teacher.safetensors"
    boxed, _ = load_or_embed_regions(path, dataset, box)
    embeddings, keys = load_or_embed_regions(path, dataset, in_place)  # other view: recomputed
    row = keys.index((dataset.stem(0), class_id))
    assert torch.allclose(embeddings[row], reference, atol=1e-5)
    assert not torch.allclose(embeddings[row], boxed[row], atol=1e-3)
    assert in_place.cache_name != box.cache_name


# -- the per-load synonym draw and the mask losses -----------------------------------------------


def test_synonym_draw_respects_threshold_and_redraws_per_load():
    scores = {"a": {1: [0.05, 0.5, 0.45], 2: [0.02, 0.03, 0.95], 3: [0.04, 0.06]}}
    draw = gkc_stage.SynonymDraw(None, scores, num_classes=5)
    sample = {
        "image": torch.zeros(3, 4, 4, dtype=torch.uint8),
        "label": torch.zeros(4, 4),
        "stem": "a",
    }
    seen = {1: set(), 2: set(), 3: set()}
    for seed in range(60):
        out = draw(sample, torch.Generator().manual_seed(seed))["synonym_draw"]
        assert out[0] == -1 and out[4] == -1
        for c in seen:
            seen[c].add(int(out[c]))
        again = draw(sample, torch.Generator().manual_seed(seed))["synonym_draw"]
        assert torch.equal(out, again)  # a pure function of the generator
    assert seen[1] == {1, 2}  # uniform among p > 0.1, both drawn
    assert seen[2] == {2}
    assert seen[3] == {1}  # none above the threshold: the most probable one
    assert torch.equal(
        gkc_stage.SynonymDraw(None, None, 3)(sample)["synonym_draw"], torch.full((3,), -1)
    )


def test_mask_losses_full_and_point_sampled():
    torch.manual_seed(0)
    pred = torch.randn(2, 8, 8)
    target = torch.rand(2, 16, 16) > 0.5
    # full masks (16 x 16 <= num_points): BCE and dice of the upsampled logits, by hand
    up = F.interpolate(pred[:, None], size=(16, 16), mode="bilinear", align_corners=False)[:, 0]
    p, t = up.flatten(1), target.flatten(1).float()
    bce_ref = F.binary_cross_entropy_with_logits(p, t)  # mean over all pixels of both
    dice_ref = (1 - (2 * (p.sigmoid() * t).sum(1) + 1) / (p.sigmoid().sum(1) + t.sum(1) + 1)).sum()
    bce, dice = gkc_stage.mask_losses(pred, target, num_points=256)
    assert torch.allclose(bce, 2 * bce_ref, atol=1e-6) and torch.allclose(dice, dice_ref, atol=1e-6)
    # point sampling reads the same bilinear values: at pixel centres it is exact
    coords = torch.tensor([[[(3 + 0.5) / 8, (5 + 0.5) / 8], [(0 + 0.5) / 8, (7 + 0.5) / 8]]])
    sampled = gkc_stage.point_sample(pred[:1, None], coords)[0, 0]
    assert torch.allclose(sampled, torch.stack([pred[0, 5, 3], pred[0, 7, 0]]))
    # a large target with few points: sampled estimate near the full value
    big = torch.zeros(1, 64, 64, dtype=torch.bool)
    big[:, 16:48, 16:48] = True
    flat = torch.full((1, 16, 16), -2.0)
    bce_points, _ = gkc_stage.mask_losses(flat, big, num_points=2000)
    bce_full, _ = gkc_stage.mask_losses(flat, big, num_points=64 * 64)
    assert abs(float(bce_points) - float(bce_full)) < 0.3


# -- the stage ----------------------------------------------------------------------------------


def test_gkc_defaults():
    d = STAGE_DEFAULTS["gkc"]
    assert (d["optimizer"], d["weight_decay"], d["grad_clip_norm"]) == ("adamw", 0.05, 0.01)
    assert d["lr_multipliers"] == {"backbone": 0.1}
    assert gkc_stage.LOSS_DEFAULTS == {
        "cost_class": 2.0, "cost_mask": 5.0, "cost_dice": 5.0, "eos_coef": 0.1,
        "weight_ce": 2.0, "weight_synonym_ce": 10.0, "weight_mask": 5.0, "weight_dice": 5.0,
        "weight_distill": 10.0,
    }  # fmt: skip


@pytest.mark.slow
def test_tiny_gkc_learns_with_synonyms_and_distillation(data_root, tmp_path, tiny_clip):
    from onepass_ovs.evaluation import evaluate

    dataset = FolderDataset(data_root, unseen=["yellow box"])
    segmenter = Segmenter.from_config("gkc-tiny", device="cpu", seed=0)
    labelled = FolderDataset(data_root)
    miou_before = evaluate(segmenter, labelled, unseen=["yellow box"], progress=False)["miou_seen"]
    before = {k: v.clone() for k, v in segmenter.model.state_dict().items()}
    flip_only = helpers_augment()
    trained = train_gkc(
        segmenter, dataset,
        quick_config(tmp_path / "run", steps=80, batch_size=4, lr=3e-3, grad_clip_norm=None,
                     log_every=5, lr_multipliers={"backbone": 1.0}),
        synonym_sources=[RECT_SYNONYMS], teacher=tiny_clip, augment=flip_only,
    )  # fmt: skip
    log = read_log(tmp_path / "run")
    first, last = log[0], log[-1]
    print(
        "\n"
        + ", ".join(f"{k} {first[k]:.3f} -> {last[k]:.3f}" for k in first if k.startswith("loss"))
    )
    assert last["loss"] < 0.6 * first["loss"]
    for term in ("loss_ce", "loss_syn_ce", "loss_mask", "loss_dice", "loss_kd"):
        assert last[term] < first[term], term
    # the four seen classes: the untrained model scores ~1 mIoU; after 80 steps ~23
    miou_after = evaluate(trained, labelled, unseen=["yellow box"], progress=False)["miou_seen"]
    print(f"mIoU {miou_before:.1f} -> {miou_after:.1f}")
    assert miou_after > 15 and miou_after > 5 * miou_before
    after = trained.model.state_dict()
    # the text tower is frozen; the rest trains (the distillation head included)
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("text_encoder."))
    for prefix in ("backbone.", "pixel_decoder.", "decoder.", "class_proj.", "distill_proj."):
        assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith(prefix))
    record = json.loads((tmp_path / "run" / "training" / "stage.json").read_text())
    assert record["teacher_mode"] == "eval" and record["synonyms"][1][:2] == [
        "red box",
        "crimson box",
    ]
    # the saved model reloads and segments
    reloaded = Segmenter.from_pretrained(tmp_path / "run", device="cpu")
    image, _ = dataset.load(0)
    result = reloaded.segment(image.permute(1, 2, 0).numpy(), dataset.classes)
    assert result.label_map.shape == (64, 64)


def helpers_augment():
    from onepass_ovs.training.augment import SegmentationAugment

    return SegmentationAugment(64, short_side=(64, 64))


def test_ablation_flags_need_no_teacher_and_drop_their_terms(data_root, tmp_path):
    dataset = FolderDataset(data_root)
    segmenter = Segmenter.from_config("gkc-tiny", device="cpu", seed=0)
    before = {k: v.clone() for k, v in segmenter.model.state_dict().items()}
    train_gkc(segmenter, dataset, quick_config(tmp_path / "plain", steps=2),
              use_synonyms=False, distill=False)  # fmt: skip
    entry = read_log(tmp_path / "plain")[-1]
    assert {"loss_ce", "loss_mask", "loss_dice"} <= set(entry)
    assert "loss_kd" not in entry and "loss_syn_ce" not in entry
    after = segmenter.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("distill_proj."))
    assert not (tmp_path / "plain" / "training" / "teacher_embeddings.safetensors").exists()

    # synonyms without the plain loss: no class cost in the matching, no loss_ce
    segmenter = Segmenter.from_config("gkc-tiny", device="cpu", seed=0)
    model, cfg = tiny_open_clip()
    train_gkc(segmenter, dataset, quick_config(tmp_path / "syn", steps=1),
              synonym_sources=[RECT_SYNONYMS], scorer=FrozenClip.from_open_clip(model, cfg),
              distill=False, plain_loss=False)  # fmt: skip
    entry = read_log(tmp_path / "syn")[-1]
    assert "loss_syn_ce" in entry and "loss_ce" not in entry
    with pytest.raises(ValueError, match="teacher"):
        train_gkc(Segmenter.from_config("gkc-tiny", device="cpu"), dataset,
                  quick_config(tmp_path / "noteacher", steps=1), use_synonyms=False)  # fmt: skip
    with pytest.raises(ValueError, match="128-d but the model's text width is 32"):
        train_gkc(Segmenter.from_config("gkc-tiny", device="cpu"), dataset,
                  quick_config(tmp_path / "wide", steps=1), use_synonyms=False,
                  teacher="demo")  # fmt: skip
    with pytest.raises(ValueError, match="gkc"):
        train_gkc(Segmenter.from_config("deop-tiny", device="cpu"), dataset,
                  quick_config(tmp_path / "deop", steps=1), distill=False)  # fmt: skip


def test_interrupted_gkc_run_resumes_to_the_uninterrupted_result(
    data_root, tmp_path, tiny_clip, monkeypatch
):
    dataset = FolderDataset(data_root, unseen=["yellow box"])

    def run(name, **kwargs):
        segmenter = Segmenter.from_config("gkc-tiny", device="cpu", seed=0)
        return train_gkc(
            segmenter, dataset, quick_config(tmp_path / name, steps=4, checkpoint_every=2),
            synonym_sources=[RECT_SYNONYMS], teacher=tiny_clip, num_points=512, **kwargs,
        )  # fmt: skip

    run("full")
    real_forward, calls = gkc_stage.GKCStage.forward, []

    def crash_in_step_three(self, *args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_forward(self, *args)

    monkeypatch.setattr(gkc_stage.GKCStage, "forward", crash_in_step_three)
    with pytest.raises(KeyboardInterrupt):
        run("resumed")
    monkeypatch.setattr(gkc_stage.GKCStage, "forward", real_forward)
    assert not (tmp_path / "resumed" / "model.safetensors").exists()
    run("resumed", resume="auto")

    full = load_file(tmp_path / "full" / "model.safetensors")
    resumed = load_file(tmp_path / "resumed" / "model.safetensors")
    assert full.keys() == resumed.keys()
    assert all(torch.equal(full[k], resumed[k]) for k in full)
    assert [e["loss"] for e in read_log(tmp_path / "resumed")] == [
        e["loss"] for e in read_log(tmp_path / "full")
    ]
    with pytest.raises(FileExistsError, match="resume"):
        run("full")


def test_ovs_train_gkc_command(data_root, tmp_path):
    from typer.testing import CliRunner

    from onepass_ovs.toy.clip import save_open_clip_folder
    from onepass_ovs.training.cli import app

    model, cfg = tiny_open_clip()
    clip_dir = save_open_clip_folder(model, cfg, tmp_path / "clip")
    rn_model, rn_cfg = tiny_open_clip(resnet=True, seed=5)  # gkc-tiny's CLIP: its init
    rn_dir = save_open_clip_folder(rn_model, rn_cfg, tmp_path / "rn")
    synonyms = tmp_path / "synonyms.json"
    synonyms.write_text(json.dumps(RECT_SYNONYMS))
    runner = CliRunner()
    common = ["--data", str(data_root), "--model", "gkc-tiny", "--steps", "2", "--batch-size", "2",
              "--workers", "0", "--no-progress", "--unseen", "yellow box"]  # fmt: skip
    result = runner.invoke(app, ["gkc", *common, "--output", str(tmp_path / "out"),
                                 "--synonyms-json", str(synonyms), "--clip", f"local-dir:{rn_dir}",
                                 "--teacher", f"local-dir:{clip_dir}",
                                 "--region-view", "in_place"])  # fmt: skip
    assert result.exit_code == 0, result.output
    saved = load_file(tmp_path / "out" / "model.safetensors")
    # --clip initialised the (frozen) text tower from the RN CLIP's weights
    assert torch.equal(
        saved["text_encoder.token_embedding.weight"], rn_model.token_embedding.weight
    )
    assert torch.equal(saved["text_encoder.text_projection"], rn_model.text_projection)
    record = json.loads((tmp_path / "out" / "training" / "stage.json").read_text())
    assert record["synonyms"][1] == ["red box", "crimson box", "scarlet box", "ruby box"]
    scores = json.loads((tmp_path / "out" / "training" / "synonym_scores.json").read_text())
    assert scores["clip"] == f"local-dir:{clip_dir} [in_place]"
    assert record["region_view"] == "in_place"

    result = runner.invoke(app, ["gkc", *common, "--output", str(tmp_path / "x")])
    assert result.exit_code == 2 and "--teacher" in result.output
    result = runner.invoke(app, ["gkc", *common, "--output", str(tmp_path / "y"), "--teacher",
                                 f"local-dir:{clip_dir}", "--region-view", "crop"])  # fmt: skip
    assert result.exit_code == 2 and "--region-view" in result.output


@pytest.mark.slow
def test_two_process_gkc_run_writes_one_model_and_shares_the_caches(data_root, tmp_path):
    from onepass_ovs.toy.clip import save_open_clip_folder

    synonyms = tmp_path / "synonyms.json"
    synonyms.write_text(json.dumps(RECT_SYNONYMS))
    clip_dir = save_open_clip_folder(*tiny_open_clip(), tmp_path / "clip")
    output = tmp_path / "out"
    helpers.run_torchrun_stage(
        "gkc", data_root, "gkc-tiny", output,
        "--synonyms-json", str(synonyms), "--teacher", f"local-dir:{clip_dir}",
    )  # fmt: skip
    run_dir = output / "training"
    assert (run_dir / "synonym_scores.json").is_file()
    assert (run_dir / "teacher_embeddings.safetensors").is_file()
    log = [json.loads(line) for line in (run_dir / "train_log.jsonl").open()]
    assert [entry["step"] for entry in log] == [1, 2, 3]
    assert all(math.isfinite(entry["loss_kd"]) for entry in log)
    state = json.loads(
        (run_dir / "checkpoints" / "step_00000003" / "trainer_state.json").read_text()
    )
    assert state["world_size"] == 2
    Segmenter.from_pretrained(output, device="cpu")
