"""Datasets on disk, the label rule, augmentation determinism and alignment, batching."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from onepass_ovs.data import (
    COCO_STUFF_CLASSES,
    COCO_STUFF_UNSEEN,
    IGNORE_INDEX,
    CocoStuffDataset,
    DatasetError,
    FolderDataset,
    RegionDataset,
    collate,
    read_label,
    sample_generator,
    sample_seed,
    save_label_png,
    semantic_to_instances,
)
from onepass_ovs.evaluation import ConfusionMatrix
from onepass_ovs.training.augment import (
    CLIP_MEAN_RGB,
    ColorJitter,
    RegionCrop,
    SegmentationAugment,
    deop_train_augment,
    resize_label,
)

CLASSES = ["background", "cat", "sofa, couch", "lamp"]


def write_image(path, array):
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(path)


def make_folder(root, items, classes=CLASSES):
    """items: {stem: (image HxWx3 uint8, mask array as stored in the PNG)}."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    if classes is not None:
        (root / "classes.txt").write_text("\n".join(classes) + "\n")
    for stem, (image, mask) in items.items():
        write_image(root / "images" / f"{stem}.png", image)
        Image.fromarray(mask).save(root / "masks" / f"{stem}.png")
    return root


def random_image(rng, h, w):
    return rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)


@pytest.fixture
def folder(tmp_path, rng):
    mask_a = np.array([[0, 1, 2], [3, 255, 1]], dtype=np.uint8)
    mask_b = np.full((4, 5), 2, dtype=np.uint8)
    items = {"b": (random_image(rng, 4, 5), mask_b), "a": (random_image(rng, 2, 3), mask_a)}
    return make_folder(tmp_path / "ds", items), items


# --------------------------------------------------------------------------- folder format


def test_folder_dataset_reads_items_in_stem_order(folder):
    root, items = folder
    ds = FolderDataset(root)
    assert ds.classes == CLASSES and ds.num_classes == 4 and len(ds) == 2
    item = ds[0]
    assert item["stem"] == "a"
    assert item["image"].dtype == torch.uint8 and item["image"].shape == (3, 2, 3)
    np.testing.assert_array_equal(item["image"].permute(1, 2, 0).numpy(), items["a"][0])
    assert item["label"].dtype == torch.int64
    # file value 255 is ignore -> IGNORE_INDEX (-1) in memory
    assert item["label"].tolist() == [[0, 1, 2], [3, IGNORE_INDEX, 1]]
    assert ds[-1]["stem"] == "b"
    with pytest.raises(IndexError):
        ds[2]


def test_unseen_classes_become_ignore_matching_synonyms(folder):
    root, _ = folder
    ds = FolderDataset(root, unseen=["Couch", "lamp"])  # synonym, any case
    assert ds.unseen_ids == [2, 3] and ds.seen_ids == [0, 1]
    assert ds[0]["label"].tolist() == [[0, 1, -1], [-1, -1, 1]]
    with pytest.raises(DatasetError, match="'dog' is not in the class list"):
        FolderDataset(root, unseen=["dog"])
    with pytest.raises(TypeError):
        FolderDataset(root, unseen="lamp")


def test_sixteen_bit_masks_for_large_vocabularies(tmp_path):
    classes = [f"class {i}" for i in range(300)]
    mask = np.array([[0, 255, 299], [65535, 7, 256]], dtype=np.uint16)
    root = make_folder(tmp_path / "big", {"x": (np.zeros((2, 3, 3)), mask)}, classes)
    label = FolderDataset(root)[0]["label"]
    # in a 16-bit file 255 is a class and 65535 is ignore
    assert label.tolist() == [[0, 255, 299], [IGNORE_INDEX, 7, 256]]


def test_save_label_png_round_trips_both_bit_depths(tmp_path):
    small = torch.tensor([[0, 254], [IGNORE_INDEX, 3]])
    save_label_png(tmp_path / "small.png", small)
    assert Image.open(tmp_path / "small.png").mode == "L"
    assert torch.equal(read_label(tmp_path / "small.png", 255), small)

    big = torch.tensor([[0, 255], [IGNORE_INDEX, 846]])
    save_label_png(tmp_path / "big.png", big)
    assert Image.open(tmp_path / "big.png").mode.startswith("I;16")
    assert torch.equal(read_label(tmp_path / "big.png", 847), big)


def test_missing_class_list_is_an_error(tmp_path, rng):
    root = make_folder(
        tmp_path / "ds", {"a": (random_image(rng, 2, 2), np.zeros((2, 2), np.uint8))}, None
    )
    with pytest.raises(DatasetError, match="classes.txt"):
        FolderDataset(root)


@pytest.mark.parametrize(
    ("lines", "message"),
    [(["cat", "", "dog"], ":2: empty class name"), (["cat", "dog, Cat"], "'Cat' used by class 0")],
)
def test_bad_class_lists(tmp_path, rng, lines, message):
    root = make_folder(
        tmp_path / "ds", {"a": (random_image(rng, 2, 2), np.zeros((2, 2), np.uint8))}, lines
    )
    with pytest.raises(DatasetError, match=message):
        FolderDataset(root)


def test_image_without_mask_is_named(folder):
    root, _ = folder
    write_image(root / "images" / "orphan.jpg", np.zeros((2, 2, 3)))
    with pytest.raises(DatasetError, match=r"orphan\.jpg has no mask .*orphan\.png"):
        FolderDataset(root)


def test_size_mismatch_is_lazy_and_found_by_validate(folder):
    root, _ = folder
    Image.fromarray(np.zeros((3, 3), np.uint8)).save(root / "masks" / "b.png")
    ds = FolderDataset(root)  # pairing only: construction stays cheap
    assert ds[0]["stem"] == "a"
    with pytest.raises(DatasetError, match=r"size mismatch: image .*b\.png is 5x4 .*b\.png is 3x3"):
        ds[1]
    with pytest.raises(DatasetError, match="size mismatch"):
        ds.validate()


def test_ids_beyond_class_list_are_named(folder):
    root, _ = folder
    Image.fromarray(np.full((4, 5), 9, np.uint8)).save(root / "masks" / "b.png")
    with pytest.raises(DatasetError, match=r"b\.png has class ids \[9\] beyond the 4 classes"):
        FolderDataset(root).validate()


def test_negative_class_ids_are_rejected_naming_the_file(folder):
    root, _ = folder
    # a 32-bit signed integer image (TIFF content under the .png name PIL opens anyway)
    ids = np.array([[0, -3, 1], [2, -1, 1], [0, 0, 0]], dtype=np.int32)
    Image.fromarray(ids).save(root / "masks" / "b.png", format="TIFF")
    assert Image.open(root / "masks" / "b.png").mode == "I"
    with pytest.raises(DatasetError, match=r"mask .*b\.png has negative class ids \[-3, -1\]"):
        read_label(root / "masks" / "b.png", 4)
    # the same image without negatives reads as class ids (65535 would be ignore)
    Image.fromarray(np.abs(ids)).save(root / "masks" / "b.png", format="TIFF")
    assert read_label(root / "masks" / "b.png", 4).tolist() == np.abs(ids).tolist()


def test_unreadable_files_are_named(folder):
    root, _ = folder
    (root / "images" / "a.png").write_bytes(b"not a png")
    with pytest.raises(DatasetError, match=r"cannot read image .*a\.png"):
        FolderDataset(root)[0]
    (root / "masks" / "b.png").write_bytes(b"garbage")
    with pytest.raises(DatasetError, match=r"cannot read mask .*b\.png"):
        FolderDataset(root)[1]


def test_colour_masks_are_rejected(folder):
    root, _ = folder
    Image.fromarray(np.zeros((4, 5, 3), np.uint8)).save(root / "masks" / "b.png")
    with pytest.raises(DatasetError, match="mode 'RGB'"):
        FolderDataset(root)[1]


def test_coco_stuff_layout_and_zero_shot_split(tmp_path, rng):
    assert len(COCO_STUFF_CLASSES) == 171 and len(set(COCO_STUFF_CLASSES)) == 171
    assert len(COCO_STUFF_UNSEEN) == 15
    assert COCO_STUFF_CLASSES[19] == "cow" and COCO_STUFF_CLASSES[170] == "wood"
    root = tmp_path / "coco"
    (root / "images" / "val2017").mkdir(parents=True)
    (root / "stuffthingmaps_detectron2" / "val2017").mkdir(parents=True)
    write_image(root / "images" / "val2017" / "000000000139.jpg", random_image(rng, 4, 6))
    cow, person, wall_concrete = 19, 0, COCO_STUFF_CLASSES.index("wall-concrete")
    mask = np.array([[cow, person, 255, 170, 170, 170]] * 4, dtype=np.uint8)
    mask[0, 5] = wall_concrete
    Image.fromarray(mask).save(root / "stuffthingmaps_detectron2" / "val2017" / "000000000139.png")

    everything = CocoStuffDataset(root, "val2017")
    assert everything[0]["label"][0].tolist() == [cow, person, -1, 170, 170, wall_concrete]
    zero_shot = CocoStuffDataset(root, "val2017", unseen=COCO_STUFF_UNSEEN)
    assert len(zero_shot.unseen_ids) == 15 and len(zero_shot.seen_ids) == 156
    assert zero_shot[0]["label"][0].tolist() == [-1, person, -1, 170, 170, -1]
    assert zero_shot[0]["image"].shape == (3, 4, 6)
    with pytest.raises(ValueError, match="split"):
        CocoStuffDataset(root, "test2017")
    with pytest.raises(DatasetError, match="image folder not found"):
        CocoStuffDataset(root, "train2017")


def test_ignore_index_is_shared_with_the_metrics():
    assert ConfusionMatrix(3).ignore_index == IGNORE_INDEX


def test_training_package_import_is_light():
    code = (
        "import sys, onepass_ovs.training as t; t.TrainConfig;"
        "heavy = [m for m in ('scipy', 'onepass_ovs.training.matcher',"
        " 'onepass_ovs.training.losses', 'onepass_ovs.data.datasets') if m in sys.modules];"
        "assert not heavy, heavy; t.SetCriterion; assert 'scipy' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_data_and_evaluation_do_not_import_training():
    # data sits below training and evaluation; evaluation must not reach into training
    code = (
        "import sys; from onepass_ovs.data import IGNORE_INDEX, resolve_unseen;"
        "from onepass_ovs.evaluation import ConfusionMatrix;"
        "assert ConfusionMatrix(2).ignore_index == IGNORE_INDEX == -1;"
        "assert resolve_unseen(['a', 'b, c'], ['C']) == [1];"
        "assert 'PIL' not in sys.modules;"
        "import onepass_ovs.data.datasets, onepass_ovs.evaluation.evaluate;"
        "import onepass_ovs.evaluation.cli; from onepass_ovs.evaluation import evaluate;"
        "loaded = [m for m in sys.modules if m.startswith('onepass_ovs.training')];"
        "assert not loaded, loaded"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# --------------------------------------------------------------------------- augmentation


def blocks(height, width, block=8, num_classes=5):
    """Label of square blocks and an image whose colour encodes the block's class."""
    ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    label = ((ys // block) * 3 + (xs // block) * 2) % num_classes
    image = torch.stack([label * 40, 200 - label * 40, label * 10 + 5]).to(torch.uint8)
    return image, label


def decode(image):
    return (image[0].float() / 40).round().long()


def interior(label, radius=2):
    """Pixels whose (2r+1)^2 neighbourhood has one label value (no blending there)."""
    padded = torch.nn.functional.pad(label[None, None].float(), (radius,) * 4, mode="replicate")
    windows = padded.unfold(2, 2 * radius + 1, 1).unfold(3, 2 * radius + 1, 1)
    windows = windows.reshape(*label.shape, -1)
    return (windows == windows[..., :1]).all(-1)


def test_sample_seed_is_stable_and_well_mixed():
    assert sample_seed(0, 1, 2) == sample_seed(0, 1, 2)
    seeds = {sample_seed(s, e, i) for s in range(2) for e in range(3) for i in range(3)}
    assert len(seeds) == 18 and all(0 <= s < 2**63 for s in seeds)


def test_augment_is_deterministic_under_a_generator():
    image, label = blocks(50, 70)
    aug = SegmentationAugment(32, (40, 90), color_jitter=ColorJitter(hue=0.05))
    first = aug.apply(image, label, sample_generator(0, 3, 7))
    again = aug.apply(image, label, sample_generator(0, 3, 7))
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    others = [aug.apply(image, label, sample_generator(0, 3, i))[0] for i in range(8, 12)]
    assert any(not torch.equal(first[0], other) for other in others)


def test_label_stays_aligned_with_image_after_resize_crop_flip():
    image, label = blocks(60, 90)
    aug = SegmentationAugment(48, (40, 120), hflip_prob=0.5)
    checked = 0
    for seed in range(12):
        out_image, out_label = aug.apply(image, label, sample_generator(seed, 0, 0))
        assert out_image.shape == (3, 48, 48) and out_label.shape == (48, 48)
        inside = interior(out_label) & (out_label != IGNORE_INDEX)
        assert torch.equal(decode(out_image)[inside], out_label[inside])
        checked += int(inside.sum())
    assert checked > 12 * 48 * 48 // 4


def test_flip_mirrors_image_and_label_together():
    image, label = blocks(64, 80)
    kept = SegmentationAugment(32, (64, 64), hflip_prob=0.0)
    flipped = SegmentationAugment(32, (64, 64), hflip_prob=1.0)
    img_a, lab_a = kept.apply(image, label, sample_generator(1, 0, 0))
    img_b, lab_b = flipped.apply(image, label, sample_generator(1, 0, 0))
    assert torch.equal(img_b, img_a.flip(-1)) and torch.equal(lab_b, lab_a.flip(-1))


def test_small_images_are_padded_to_exact_crops():
    image, label = blocks(20, 30)
    aug = deop_train_augment(crop_size=64)
    aug.short_side = (20, 20)  # no growth: 20 x 30 stays smaller than 64 x 64
    out_image, out_label = aug.apply(image, label, sample_generator(2, 0, 0))
    assert out_image.shape == (3, 64, 64) and out_label.shape == (64, 64)
    assert (out_label[20:] == IGNORE_INDEX).all() and (out_label[:, 30:] == IGNORE_INDEX).all()
    assert (out_image[:, 20:] == 128).all() and (out_image[:, :, 30:] == 128).all()
    assert (out_label[:20, :30] != IGNORE_INDEX).all()


def test_colour_jitter_changes_colours_not_geometry():
    image, label = blocks(40, 40)
    plain = SegmentationAugment(32, (40, 60))
    jittered = SegmentationAugment(32, (40, 60), color_jitter=ColorJitter(prob=1.0, hue=0.1))
    img_a, lab_a = plain.apply(image, label, sample_generator(3, 0, 0))
    img_b, lab_b = jittered.apply(image, label, sample_generator(3, 0, 0))
    assert torch.equal(lab_a, lab_b) and not torch.equal(img_a, img_b)


def test_hue_rotation_keeps_greys_grey():
    grey = torch.full((3, 4, 4), 90, dtype=torch.uint8)
    hue_only = ColorJitter(brightness=0, contrast=(1, 1), saturation=(1, 1), hue=0.5, prob=1.0)
    assert torch.equal(hue_only(grey, torch.Generator().manual_seed(0)), grey)


def test_resize_label_is_exact_nearest():
    label = torch.tensor([[0, 1], [2, IGNORE_INDEX]])
    expected = label.repeat_interleave(3, 0).repeat_interleave(3, 1)
    assert torch.equal(resize_label(label, (6, 6)), expected)
    assert torch.equal(resize_label(expected, (2, 2)), label)
    # shrinking by 3 reads the middle pixel of each triplet: the one whose centre is the
    # output pixel's centre, as bilinear (align_corners=False) samples the image
    assert resize_label(torch.arange(6)[None], (1, 2)).tolist() == [[1, 4]]


def test_dataset_items_are_a_function_of_seed_epoch_index(folder):
    root, _ = folder
    aug = SegmentationAugment(4, (3, 8), color_jitter=ColorJitter())
    ds = FolderDataset(root, transform=aug, seed=5)
    epoch1 = ds[(1, 1)]
    assert torch.equal(ds[(1, 1)]["image"], epoch1["image"])
    ds.set_epoch(1)
    assert torch.equal(ds[1]["image"], epoch1["image"]) and ds[1]["stem"] == "b"
    draws = {tuple(ds[(e, 1)]["image"].flatten().tolist()) for e in range(6)}
    assert len(draws) > 1
    # any worker count gives the same items
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2, collate_fn=collate)
    in_workers = next(iter(loader))
    assert torch.equal(in_workers["label"][1], ds[(1, 1)]["label"])
    assert torch.equal(in_workers["image"][1], ds[(1, 1)]["image"].float() / 255)


# --------------------------------------------------------------------------- region crops


def test_region_crop_keeps_only_the_region_on_the_fill_colour():
    image = torch.zeros(3, 40, 40, dtype=torch.uint8)
    image[2] = 255  # blue everywhere ...
    label = torch.zeros(40, 40, dtype=torch.int64)
    label[10:30, 5:15] = 2  # ... an L-shaped region of class 2, painted red
    label[20:30, 15:35] = 2
    image[:, label == 2] = torch.tensor([220, 0, 0], dtype=torch.uint8)[:, None]
    crop = RegionCrop(64, scale=(1.0, 1.0), ratio=(1.0, 3.0), hflip_prob=0.0)
    out = crop({"image": image, "label": label, "class_id": 2, "stem": "s"}, None)
    assert out["image"].shape == (3, 64, 64) and out["class_id"] == 2 and "label" not in out
    pixels = out["image"].reshape(3, -1).T.tolist()
    assert [220, 0, 0] in pixels and list(CLIP_MEAN_RGB) in pixels
    assert out["image"][2].max() <= CLIP_MEAN_RGB[2]  # no blue background leaks in


def test_region_crop_picks_a_present_class_deterministically():
    image, label = blocks(32, 32, num_classes=5)
    label[label == 3] = IGNORE_INDEX
    crop = RegionCrop(16)
    picks = {crop.pick_class(label, torch.Generator().manual_seed(s)) for s in range(40)}
    assert picks == {0, 1, 2, 4}
    sample = {"image": image, "label": label}
    first = crop(sample, sample_generator(0, 0, 0))
    again = crop(sample, sample_generator(0, 0, 0))
    assert first["class_id"] == again["class_id"] and torch.equal(first["image"], again["image"])
    with pytest.raises(ValueError, match="no labelled region"):
        crop.pick_class(torch.full((4, 4), IGNORE_INDEX))


def test_region_dataset_lists_every_region(folder):
    root, _ = folder
    ds = FolderDataset(root, unseen=["lamp"])
    regions = RegionDataset(ds, transform=RegionCrop(8), seed=0)
    # image a: classes 0, 1, 2 (3 is unseen), image b: class 2
    assert regions.regions == [(0, 0), (0, 1), (0, 2), (1, 2)]
    item = regions[3]
    assert item["class_id"] == 2 and item["stem"] == "b" and item["image"].shape == (3, 8, 8)
    assert torch.equal(regions[(0, 3)]["image"], item["image"])
    batch = collate([regions[0], regions[1]])
    assert batch["class_id"].tolist() == [0, 1] and batch["image"].dtype == torch.float32


# --------------------------------------------------------------------------- batching


def test_collate_stacks_equal_crops():
    items = [
        {
            "image": torch.full((3, 4, 4), 255, dtype=torch.uint8),
            "label": torch.zeros(4, 4, dtype=torch.int64),
            "stem": "a",
        },
        {
            "image": torch.zeros(3, 4, 4, dtype=torch.uint8),
            "label": torch.ones(4, 4, dtype=torch.int64),
            "stem": "b",
        },
    ]
    batch = collate(items)
    assert batch["image"].shape == (2, 3, 4, 4) and batch["image"].dtype == torch.float32
    assert batch["image"][0].max() == 1.0 and batch["image"][1].max() == 0.0
    assert batch["label"].shape == (2, 4, 4) and batch["label"].dtype == torch.int64
    assert batch["stem"] == ["a", "b"]
    items[1]["label"] = torch.ones(5, 4, dtype=torch.int64)
    with pytest.raises(ValueError, match="equal-size 'label'"):
        collate(items)


def test_semantic_to_instances():
    label = torch.tensor([[3, 3, IGNORE_INDEX], [0, 3, 0]])
    classes, masks = semantic_to_instances(label)
    assert classes.tolist() == [0, 3] and masks.dtype == torch.bool
    assert masks[0].tolist() == [[False, False, False], [True, False, True]]
    assert masks[1].tolist() == [[True, True, False], [False, True, False]]
    classes, masks = semantic_to_instances(torch.full((2, 2), IGNORE_INDEX))
    assert classes.shape == (0,) and masks.shape == (0, 2, 2)
    classes, _ = semantic_to_instances(torch.tensor([[255, 1]]), ignore_index=255)
    assert classes.tolist() == [1]
