"""Shapes world: vocabulary, exact labels, determinism, captions and the folder exporter."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from onepass_ovs.toy import export, scenes
from onepass_ovs.toy.scenes import (
    CLASS_NAMES,
    IGNORE_INDEX,
    SEEN_CLASSES,
    UNSEEN_CLASSES,
    make_object,
    rasterize_objects,
    render_scene,
    render_scenes,
    training_label,
)

# --------------------------------------------------------------------------------------
# Independent geometry: an even-odd crossing test on the polygon outline, so the label
# check does not reuse the generator's own (half-plane / angle-folding) membership code.


def _polygon_in_image(obj: scenes.SceneObject) -> np.ndarray:
    shape = obj.class_name.split(" ")[1]
    c, s = math.cos(obj.angle), math.sin(obj.angle)
    rotation = np.array([[c, -s], [s, c]])
    canonical = scenes.shape_vertices(shape, obj.shape_param)
    return canonical @ rotation.T * obj.scale + np.asarray(obj.centre)


def _inside_polygon(vertices: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    inside = np.zeros(np.broadcast(x, y).shape, dtype=bool)
    for (x0, y0), (x1, y1) in zip(vertices, np.roll(vertices, -1, axis=0), strict=True):
        straddles = (y0 > y) != (y1 > y)
        with np.errstate(divide="ignore", invalid="ignore"):
            x_cross = x0 + (y - y0) * (x1 - x0) / (y1 - y0)
        inside ^= straddles & (x < x_cross)
    return inside


def _expected_label(objects: list[scenes.SceneObject], size: int) -> np.ndarray:
    ys, xs = np.mgrid[0:size, 0:size] + 0.5
    label = np.zeros((size, size), dtype=np.int64)
    for obj in objects:
        if obj.class_name.endswith("circle"):
            radius = obj.scale
            inside = (xs - obj.centre[0]) ** 2 + (ys - obj.centre[1]) ** 2 <= radius**2
        else:
            inside = _inside_polygon(_polygon_in_image(obj), xs, ys)
        label[inside] = obj.class_id
    return label


# --------------------------------------------------------------------------------------
# Vocabulary.


def test_vocabulary_follows_the_spec():
    assert len(CLASS_NAMES) == 31
    assert CLASS_NAMES[0] == "background"
    assert CLASS_NAMES[1:6] == (
        "red circle", "red square", "red triangle", "red star", "red cross",
    )
    assert CLASS_NAMES[6] == "green circle"
    assert CLASS_NAMES[30] == "orange cross"
    assert list(scenes.COLOURS) == ["red", "green", "blue", "yellow", "purple", "orange"]
    assert scenes.COLOURS["purple"] == (150, 60, 200)
    assert set(UNSEEN_CLASSES) == {
        "red star", "green cross", "blue circle", "yellow triangle", "purple square",
        "orange star",
    }
    assert len(SEEN_CLASSES) == 24
    assert set(SEEN_CLASSES) | set(UNSEEN_CLASSES) == set(CLASS_NAMES[1:])
    assert IGNORE_INDEX == 255


# --------------------------------------------------------------------------------------
# Determinism.


def test_same_seed_same_scene_and_different_seeds_differ():
    a, b, c = render_scene(7), render_scene(7), render_scene(8)
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.label, b.label)
    assert a.caption == b.caption and a.objects == b.objects
    assert not np.array_equal(a.image, c.image)


def test_render_scenes_is_a_reproducible_stream():
    full = render_scenes(3, 5, size=64)
    again = render_scenes(3, 5, size=64)
    tail = render_scenes(3, 2, size=64, start=3)
    np.testing.assert_array_equal(full.images, again.images)
    np.testing.assert_array_equal(full.images[3:], tail.images)
    np.testing.assert_array_equal(full.labels[3:], tail.labels)
    assert full.captions[3:] == tail.captions
    single = render_scene(np.random.default_rng([3, 4]), 64)
    np.testing.assert_array_equal(full.images[4], single.image)
    assert full.images.shape == (5, 64, 64, 3) and full.images.dtype == np.uint8
    assert full.labels.shape == (5, 64, 64) and full.labels.dtype == np.int64
    other = render_scenes(4, 5, size=64)
    assert not np.array_equal(full.images, other.images)


# --------------------------------------------------------------------------------------
# Exact labels.


def test_hand_placed_square_and_circle_labels_are_exact():
    square = make_object("red square", centre=(20.0, 20.0), side=20.0)
    circle = make_object("blue circle", centre=(64.0, 64.0), side=30.0)
    _, label = rasterize_objects([square, circle], 128)
    expected = np.zeros((128, 128), dtype=np.int64)
    # Pixel centres j + 0.5 in [10, 30] -> columns/rows 10..29.
    expected[10:30, 10:30] = scenes.class_id("red square")
    ys, xs = np.mgrid[0:128, 0:128] + 0.5
    expected[(xs - 64) ** 2 + (ys - 64) ** 2 <= 15**2] = scenes.class_id("blue circle")
    np.testing.assert_array_equal(label, expected)
    assert square.bbox == pytest.approx((10.0, 10.0, 30.0, 30.0))


def test_hand_placed_cross_has_empty_corners_and_star_matches_its_outline():
    cross = make_object("green cross", centre=(32.0, 32.0), side=30.0, shape_param=1 / 3)
    _, label = rasterize_objects([cross], 64)
    green_cross = scenes.class_id("green cross")
    assert label[31, 31] == green_cross  # centre
    assert label[31, 18] == green_cross  # left arm (x = 18.5, |y - 32| = 0.5 <= 5)
    assert label[20, 20] == 0  # notch between arms (|dx|, |dy| = 11.5 > 5)
    assert label[31, 16] == 0  # beyond the arm's end (x = 16.5 < 17)
    star = make_object("yellow star", centre=(40.3, 41.7), side=50.0, angle=0.7)
    _, star_label = rasterize_objects([star], 80)
    np.testing.assert_array_equal(star_label, _expected_label([star], 80))


def test_later_objects_occlude_earlier_ones():
    a = make_object("red circle", centre=(30.0, 32.0), side=30.0)
    b = make_object("blue square", centre=(40.0, 32.0), side=30.0)
    _, a_then_b = rasterize_objects([a, b], 64)
    _, b_then_a = rasterize_objects([b, a], 64)
    overlap_pixel = (31, 35)  # inside both shapes
    assert a_then_b[overlap_pixel] == scenes.class_id("blue square")
    assert b_then_a[overlap_pixel] == scenes.class_id("red circle")


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4, 5])
def test_random_scene_labels_match_independent_geometry(seed):
    scene = render_scene(seed, 128)
    np.testing.assert_array_equal(scene.label, _expected_label(scene.objects, 128))


def test_objects_sizes_visibility_and_colours():
    batch = render_scenes(11, 40, size=128)
    counts = []
    for scene in batch:
        counts.append(len(scene.objects))
        assert len({o.class_id for o in scene.objects}) == len(scene.objects)
        present = set(np.unique(scene.label).tolist()) - {0}
        assert present == {o.class_id for o in scene.objects}
        for obj in scene.objects:
            x0, y0, x1, y1 = obj.bbox
            assert 20.0 - 1e-6 <= max(x1 - x0, y1 - y0) <= 56.0 + 1e-6
            assert x0 >= -1e-6 and y0 >= -1e-6 and x1 <= 128 + 1e-6 and y1 <= 128 + 1e-6
            rows, cols = np.nonzero(scene.label == obj.class_id)
            assert cols.min() + 0.5 >= x0 and cols.max() + 0.5 <= x1
            assert rows.min() + 0.5 >= y0 and rows.max() + 0.5 <= y1
            centre = np.array(scenes.COLOURS[obj.class_name.split(" ")[0]])
            assert np.abs(np.array(obj.colour_rgb) - centre).max() <= 20
    assert min(counts) >= 1 and max(counts) <= 4 and len(set(counts)) >= 3
    half = render_scenes(11, 10, size=64)
    for scene in half:
        for obj in scene.objects:
            x0, y0, x1, y1 = obj.bbox
            assert 10.0 - 1e-6 <= max(x1 - x0, y1 - y0) <= 28.0 + 1e-6


def test_object_interiors_have_their_colour_and_background_is_never_a_shape_colour():
    batch = render_scenes(21, 30, size=96)
    colours = np.array(list(scenes.COLOURS.values()), dtype=np.int64)
    for scene in batch:
        image = scene.image.astype(np.int64)
        label = scene.label
        # Pixels whose 5 x 5 neighbourhood shares one label are (almost always) free of
        # anti-aliased edge blending; a narrow concave notch may still cut a few.
        padded = np.pad(label, 2, mode="edge")
        uniform = np.ones_like(label, dtype=bool)
        for dy in range(5):
            for dx in range(5):
                uniform &= padded[dy:dy + label.shape[0], dx:dx + label.shape[1]] == label
        background = image[(label == 0) & uniform]
        chroma = background.max(axis=1) - background.min(axis=1)
        assert chroma.max() < 70
        distance = np.abs(background[:, None, :] - colours[None, :, :]).max(axis=2)
        assert distance.min() > 40  # jittered object colours lie within 20
        for obj in scene.objects:
            interior = image[(label == obj.class_id) & uniform]
            if len(interior) == 0:
                continue
            exact = (interior == np.asarray(obj.colour_rgb)).all(axis=1)
            assert exact.mean() >= 0.95


def test_training_label_ignores_exactly_the_unseen_classes():
    label = np.arange(31, dtype=np.int64).reshape(1, 31).repeat(2, axis=0)
    out = training_label(label)
    unseen_ids = [scenes.class_id(name) for name in UNSEEN_CLASSES]
    for cls in range(31):
        expected = IGNORE_INDEX if cls in unseen_ids else cls
        assert (out[:, cls] == expected).all()
    assert label[0, unseen_ids[0]] == unseen_ids[0]  # input untouched


# --------------------------------------------------------------------------------------
# Captions.


def _named_classes(caption: str) -> list[str]:
    return [name for name in CLASS_NAMES[1:] for _ in range(caption.count(name))]


def test_captions_name_exactly_the_objects_present():
    batch = render_scenes(5, 300, size=32, supersample=1)
    mentioned: set[str] = set()
    openings = set()
    for scene in batch:
        names = _named_classes(scene.caption)
        assert sorted(names) == sorted(o.class_name for o in scene.objects), scene.caption
        mentioned.update(names)
        openings.add(" ".join(scene.caption.split(" ")[:2]))
    assert mentioned == set(CLASS_NAMES[1:])
    assert len(openings) >= 5  # several templates, not one fixed sentence


def test_captions_name_the_background_as_it_looks():
    batch = render_scenes(6, 300, size=32, supersample=1)
    with_background = [c for c in batch.captions if "background" in c]
    # most captions name it (BACKGROUND_CAPTION_FRACTION = 0.6), in several templates
    assert 0.45 < len(with_background) / len(batch.captions) < 0.75
    words = {w for c in with_background for w in c.rstrip(".").split(" ")}
    assert {"grey", "brown", "plain", "textured", "dark", "light"} <= words
    assert len({c.split(" ")[0] for c in with_background}) >= 3
    for scene in batch:
        # the background's colour word follows its actual tint: brown has red > blue
        caption = scene.caption
        if " brown " in caption or " grey " in caption:
            back = scene.label == 0
            red, blue = (scene.image[..., k][back].astype(float).mean() for k in (0, 2))
            if " brown " in caption:
                assert red - blue > 18.5, caption
            else:
                assert red - blue < 21.5, caption
        # the background's words are never one of the six object colours
        words = caption.rstrip(".").split(" ")
        if "background" in words:
            end = words.index("background")
            start = max(i for i in range(end) if words[i] in ("a", "an"))
            assert not set(words[start:end]) & set(scenes.COLOURS), caption


def test_captions_use_the_right_article():
    rng = np.random.default_rng(1)
    an_image = 0
    for _ in range(200):
        caption = scenes.make_caption(rng, ["orange star", "red circle", "blue cross"])
        assert "an orange star" in caption and "a orange" not in caption, caption
        assert "a red circle" in caption and "an red" not in caption, caption
        an_image += caption.startswith("an image of")
        assert "a image" not in caption
    assert an_image > 0
    assert scenes.with_article("orange square") == "an orange square"
    assert scenes.with_article("yellow star") == "a yellow star"
    assert scenes.describe_background(rng, scenes.BackgroundLook()).endswith("background")


def test_caption_object_order_varies():
    rng = np.random.default_rng(0)
    captions = {scenes.make_caption(rng, ["red circle", "blue square"]) for _ in range(40)}
    firsts = {min(("red circle", "blue square"), key=c.index) for c in captions}
    assert firsts == {"red circle", "blue square"}


# --------------------------------------------------------------------------------------
# Exporter.


def test_export_folder_round_trip(tmp_path):
    root = export.export_folder(tmp_path / "clean", n=6, seed=9, size=48)
    reference = render_scenes(9, 6, size=48)
    assert (root / "classes.txt").read_text().splitlines() == list(CLASS_NAMES)
    stems = sorted(p.stem for p in (root / "images").glob("*.png"))
    assert stems == sorted(p.stem for p in (root / "masks").glob("*.png")) and len(stems) == 6
    for k, stem in enumerate(stems):
        image = np.asarray(Image.open(root / "images" / f"{stem}.png"))
        mask = np.asarray(Image.open(root / "masks" / f"{stem}.png"))
        np.testing.assert_array_equal(image, reference.images[k])
        np.testing.assert_array_equal(mask, reference.labels[k])


def test_export_cli_writes_training_labels(tmp_path):
    export.main(["--output", str(tmp_path / "train"), "--num", "40", "--seed", "2",
                 "--size", "32", "--train-labels"])
    reference = render_scenes(2, 40, size=32)
    masks = np.stack([
        np.asarray(Image.open(p)) for p in sorted((tmp_path / "train" / "masks").glob("*.png"))
    ])
    np.testing.assert_array_equal(masks, training_label(reference.labels))
    assert (masks == IGNORE_INDEX).any()  # 40 scenes certainly contain an unseen class
