"""The shapes world: procedurally rendered scenes, exact label maps and captions.

Follows ``docs/shapes_world.md``: six colours x five shapes = 30 object classes plus
"background"; 1 to 4 filled, rotated, possibly occluding shapes on a smooth
low-saturation grey/brown texture.

Conventions used throughout:

- Images are ``(H, W, 3)`` uint8 RGB; label maps are ``(H, W)`` int64 class ids.
- Pixel ``(row i, column j)`` has its centre at ``(x, y) = (j + 0.5, i + 0.5)``;
  ``x`` grows to the right, ``y`` grows downwards.
- Bounding boxes are ``(x0, y0, x1, y1)`` floats in those pixel coordinates and
  are tight around the (rotated) shape's geometry.
- The label of a pixel is the last-drawn object whose shape contains the pixel
  centre, computed analytically; the image is rendered from the same geometry
  with supersampled (anti-aliased) coverage.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

__all__ = [
    "CLASS_NAMES",
    "COLOURS",
    "IGNORE_INDEX",
    "SEEN_CLASSES",
    "SHAPES",
    "UNSEEN_CLASSES",
    "BackgroundLook",
    "Scene",
    "SceneBatch",
    "SceneObject",
    "class_id",
    "describe_background",
    "make_caption",
    "make_object",
    "object_contains",
    "rasterize_objects",
    "render_scene",
    "render_scenes",
    "shape_contains",
    "shape_vertices",
    "training_label",
    "with_article",
]

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 210, 40),
    "purple": (150, 60, 200),
    "orange": (245, 140, 30),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross")
CLASS_NAMES: tuple[str, ...] = ("background",) + tuple(
    f"{colour} {shape}" for colour in COLOURS for shape in SHAPES
)
UNSEEN_CLASSES: tuple[str, ...] = (
    "red star",
    "green cross",
    "blue circle",
    "yellow triangle",
    "purple square",
    "orange star",
)
#: The 24 object classes labelled during segmentation training (background excluded).
SEEN_CLASSES: tuple[str, ...] = tuple(
    name for name in CLASS_NAMES[1:] if name not in UNSEEN_CLASSES
)
IGNORE_INDEX = 255

COLOUR_JITTER = 20
#: Bounding-box side range (the larger of width and height) at the reference size 128 px.
OBJECT_SIZE_RANGE = (20.0, 56.0)
REFERENCE_SIZE = 128
MAX_OBJECTS = 4
#: An object stays in a scene only if at least this fraction of its pixels remains visible,
#: so every object a caption names can actually be seen.
MIN_VISIBLE_FRACTION = 0.5
#: Geometry jitter ranges; varied so that a model is not tied to one exact drawing style.
STAR_INNER_RATIO_RANGE = (0.38, 0.5)
CROSS_ARM_RATIO_RANGE = (0.28, 0.4)

_CLASS_INDEX = {name: index for index, name in enumerate(CLASS_NAMES)}
_UNSEEN_IDS = np.array([_CLASS_INDEX[name] for name in UNSEEN_CLASSES], dtype=np.int64)


def class_id(name: str) -> int:
    """Index of ``name`` in :data:`CLASS_NAMES` (0 is background)."""
    return _CLASS_INDEX[name]


class SceneObject(NamedTuple):
    """One drawn object. ``bbox`` is ``(x0, y0, x1, y1)`` in pixel coordinates."""

    class_name: str
    bbox: tuple[float, float, float, float]
    class_id: int
    colour_rgb: tuple[int, int, int]
    centre: tuple[float, float]
    scale: float
    angle: float
    shape_param: float


@dataclass(frozen=True)
class BackgroundLook:
    """How a scene's background looks, in caption words: ``colour`` "grey" or "brown"
    (from its tint), ``tone`` "dark", "light" or "" (from its lightness), ``texture``
    "textured" or "plain" (from the amplitude of its smooth variation)."""

    colour: str = "grey"
    tone: str = ""
    texture: str = "plain"


@dataclass
class Scene:
    """A rendered scene.

    Attributes:
        image: ``(H, W, 3)`` uint8 RGB.
        label: ``(H, W)`` int64 class ids into :data:`CLASS_NAMES`; 0 = background,
            no ignore pixels.
        objects: the drawn objects in drawing order (later ones occlude earlier ones).
        caption: an image-level caption naming every object once.
    """

    image: np.ndarray
    label: np.ndarray
    objects: list[SceneObject]
    caption: str


@dataclass
class SceneBatch:
    """Many scenes stacked: ``images`` ``(N, H, W, 3)`` uint8, ``labels`` ``(N, H, W)`` int64."""

    images: np.ndarray
    labels: np.ndarray
    objects: list[list[SceneObject]]
    captions: list[str]

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, index: int) -> Scene:
        return Scene(
            self.images[index], self.labels[index], self.objects[index], self.captions[index]
        )


# --------------------------------------------------------------------------------------
# Geometry. Every shape lives in a canonical frame (centred at the origin, extent about
# [-1, 1]) and is placed by p = centre + scale * R(angle) q.


def shape_vertices(shape: str, shape_param: float = 0.0) -> np.ndarray:
    """Polygon vertices ``(V, 2)`` of ``shape`` in its canonical frame (counter-clockwise).

    Circles are returned as a fine 256-gon (only used for bounding boxes and plots; the
    membership test for circles is exact). ``shape_param`` is the star's inner radius
    ratio or the cross's arm half-width; other shapes ignore it.
    """
    if shape == "circle":
        angles = np.linspace(0.0, 2.0 * math.pi, 256, endpoint=False)
        return np.stack([np.cos(angles), np.sin(angles)], axis=1)
    if shape == "square":
        return np.array([[-1.0, -1.0], [1.0, -1.0], [1.0, 1.0], [-1.0, 1.0]])
    if shape == "triangle":
        angles = -math.pi / 2 + np.arange(3) * 2.0 * math.pi / 3
        return np.stack([np.cos(angles), np.sin(angles)], axis=1)
    if shape == "star":
        angles = -math.pi / 2 + np.arange(10) * math.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, 1.0, shape_param)
        return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)
    if shape == "cross":
        a = shape_param
        return np.array(
            [
                [a, -1], [a, -a], [1, -a], [1, a], [a, a], [a, 1],
                [-a, 1], [-a, a], [-1, a], [-1, -a], [-a, -a], [-a, -1],
            ],
            dtype=np.float64,
        )
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def shape_contains(shape: str, u: np.ndarray, v: np.ndarray, shape_param: float = 0.0):
    """Exact membership of canonical-frame points ``(u, v)`` (any equal shapes) -> bool array.

    Convex shapes use half-planes; the star folds the angle into one of its ten
    half-sectors (it is star-shaped around the origin) and tests a single edge.
    """
    if shape == "circle":
        return u * u + v * v <= 1.0
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 1.0
    if shape == "triangle":
        # Edge normals of the canonical (apex-up) equilateral triangle point at
        # +90, +210 and +330 degrees; the apothem of a unit-circumradius triangle is 1/2.
        inside = np.ones(np.shape(u), dtype=bool)
        for degrees in (90.0, 210.0, 330.0):
            t = math.radians(degrees)
            inside &= u * math.cos(t) + v * math.sin(t) <= 0.5
        return inside
    if shape == "star":
        rho = np.hypot(u, v)
        # Angle measured from the nearest tip, folded to [0, pi/5].
        phi = np.arctan2(v, u) + math.pi / 2
        half_sector = math.pi / 5
        delta = np.abs(np.mod(phi + half_sector, 2 * half_sector) - half_sector)
        x, y = rho * np.cos(delta), rho * np.sin(delta)
        # Edge from the tip (1, 0) to the inner vertex; the origin side is inside.
        ix, iy = shape_param * math.cos(half_sector), shape_param * math.sin(half_sector)
        cross_tip = (ix - 1.0) * y - iy * (x - 1.0)
        cross_origin = (ix - 1.0) * 0.0 - iy * (0.0 - 1.0)
        return cross_tip * cross_origin >= 0.0
    if shape == "cross":
        au, av = np.abs(u), np.abs(v)
        a = shape_param
        return ((au <= 1.0) & (av <= a)) | ((au <= a) & (av <= 1.0))
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def _rotation(angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return np.array([[c, -s], [s, c]])


def _object_extent(shape: str, shape_param: float, angle: float) -> tuple[np.ndarray, np.ndarray]:
    """Axis-aligned min and max ``(2,)`` of the unit-scale shape rotated by ``angle``."""
    if shape == "circle":
        return np.array([-1.0, -1.0]), np.array([1.0, 1.0])
    rotated = shape_vertices(shape, shape_param) @ _rotation(angle).T
    return rotated.min(axis=0), rotated.max(axis=0)


def object_contains(obj: SceneObject, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Whether image-coordinate points ``(x, y)`` lie inside ``obj`` -> bool array."""
    shape = SHAPES[(obj.class_id - 1) % len(SHAPES)]
    c, s = math.cos(obj.angle), math.sin(obj.angle)
    dx, dy = (x - obj.centre[0]) / obj.scale, (y - obj.centre[1]) / obj.scale
    # Inverse rotation R(-angle) maps image offsets back to the canonical frame.
    u = c * dx + s * dy
    v = -s * dx + c * dy
    return shape_contains(shape, u, v, obj.shape_param)


def _pixel_window(obj: SceneObject, size: int) -> tuple[int, int, int, int]:
    x0, y0, x1, y1 = obj.bbox
    return (
        max(int(math.floor(x0)), 0),
        max(int(math.floor(y0)), 0),
        min(int(math.ceil(x1)), size),
        min(int(math.ceil(y1)), size),
    )


def _centre_mask(obj: SceneObject, size: int) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """Pixel-centre membership inside the object's pixel window: ``(h, w)`` bool, window."""
    window = _pixel_window(obj, size)
    c0, r0, c1, r1 = window
    xs = np.arange(c0, c1) + 0.5
    ys = np.arange(r0, r1) + 0.5
    return object_contains(obj, xs[None, :], ys[:, None]), window


def _coverage_and_centre(
    obj: SceneObject, size: int, supersample: int
) -> tuple[np.ndarray, np.ndarray, tuple[int, int, int, int]]:
    """Coverage ``(h, w)`` float32 and centre membership ``(h, w)`` bool in the object's window.

    ``supersample`` is odd, so the pixel centre is one of the ``supersample**2`` sub-samples
    and the exact label comes from the same evaluation as the anti-aliased coverage.
    """
    if supersample < 1 or supersample % 2 == 0:
        raise ValueError(f"supersample must be a positive odd number, got {supersample}")
    window = _pixel_window(obj, size)
    c0, r0, c1, r1 = window
    offsets = (np.arange(supersample) + 0.5) / supersample
    xs = (np.arange(c0, c1)[:, None] + offsets[None, :]).reshape(-1)
    ys = (np.arange(r0, r1)[:, None] + offsets[None, :]).reshape(-1)
    inside = object_contains(obj, xs[None, :], ys[:, None])
    inside = inside.reshape(r1 - r0, supersample, c1 - c0, supersample)
    centre = inside[:, supersample // 2, :, supersample // 2]
    return inside.mean(axis=(1, 3), dtype=np.float32), centre, window


# --------------------------------------------------------------------------------------
# Sampling.


def _smooth_field(rng: np.random.Generator, size: int) -> np.ndarray:
    """A smooth random field ``(size, size)`` in about [-1, 1] (bilinear upsampling of a grid)."""
    grid = int(rng.integers(3, 7))
    coarse = rng.uniform(-1.0, 1.0, size=(grid, grid))
    positions = (np.arange(size) + 0.5) / size * (grid - 1)
    lower = np.clip(np.floor(positions).astype(int), 0, grid - 2)
    frac = positions - lower
    interp = np.zeros((size, grid))
    interp[np.arange(size), lower] = 1.0 - frac
    interp[np.arange(size), lower + 1] += frac
    return interp @ coarse @ interp.T


def _background_and_look(
    rng: np.random.Generator, size: int, noise: bool
) -> tuple[np.ndarray, BackgroundLook]:
    """Low-saturation grey/brown texture ``(size, size, 3)`` float32 in [0, 255], and how
    it looks (for the caption).

    Chroma (max - min channel) stays below about 56 even with noise, while every
    jittered object colour has chroma of at least 90, so the background can never be
    mistaken for one of the six colours.
    """
    lightness = rng.uniform(70.0, 190.0)
    amplitude = rng.uniform(10.0, 35.0)
    brown = rng.uniform(0.0, 22.0)
    luminance = lightness + amplitude * _smooth_field(rng, size)
    tint = brown * np.array([1.0, 0.35, -0.8])
    rgb = luminance[:, :, None] + tint[None, None, :]
    if noise:
        sigma = rng.uniform(0.0, 4.0)
        noise_field = rng.standard_normal(size=rgb.shape, dtype=np.float32)
        rgb = rgb + np.clip(noise_field * sigma, -8.0, 8.0)
    look = BackgroundLook(
        colour="brown" if brown > 11.0 else "grey",
        tone="dark" if lightness < 100.0 else ("light" if lightness > 160.0 else ""),
        texture="textured" if amplitude > 22.0 else "plain",
    )
    return np.clip(rgb, 0.0, 255.0).astype(np.float32), look


def make_object(
    class_name: str,
    centre: tuple[float, float],
    side: float,
    angle: float = 0.0,
    colour_rgb: tuple[int, int, int] | None = None,
    shape_param: float | None = None,
) -> SceneObject:
    """Place one object by hand.

    Args:
        class_name: an object class, e.g. ``"red star"``.
        centre: ``(x, y)`` of the shape's canonical origin in pixel coordinates.
        side: the larger side of the rotated shape's tight bounding box, in pixels.
        angle: rotation in radians (counter-clockwise in the canonical frame; as ``y``
            points down in images, clockwise on screen).
        colour_rgb: fill colour; defaults to the colour's centre value.
        shape_param: star inner radius ratio or cross arm half-width (canonical units);
            defaults to the middle of the sampled range.
    """
    colour_name, shape = class_name.split(" ")
    if shape_param is None:
        if shape == "star":
            shape_param = sum(STAR_INNER_RATIO_RANGE) / 2
        elif shape == "cross":
            shape_param = sum(CROSS_ARM_RATIO_RANGE) / 2
        else:
            shape_param = 0.0
    lo, hi = _object_extent(shape, shape_param, angle)
    scale = side / float(np.max(hi - lo))
    cx, cy = centre
    bbox = (cx + lo[0] * scale, cy + lo[1] * scale, cx + hi[0] * scale, cy + hi[1] * scale)
    return SceneObject(
        class_name=class_name,
        bbox=tuple(float(b) for b in bbox),
        class_id=class_id(class_name),
        colour_rgb=tuple(int(c) for c in (colour_rgb or COLOURS[colour_name])),
        centre=(float(cx), float(cy)),
        scale=scale,
        angle=float(angle),
        shape_param=float(shape_param),
    )


def _sample_object(
    rng: np.random.Generator, cls: int, size: int, object_size: tuple[float, float]
) -> SceneObject:
    name = CLASS_NAMES[cls]
    colour_name, shape = name.split(" ")
    if shape == "star":
        shape_param = float(rng.uniform(*STAR_INNER_RATIO_RANGE))
    elif shape == "cross":
        shape_param = float(rng.uniform(*CROSS_ARM_RATIO_RANGE))
    else:
        shape_param = 0.0
    angle = float(rng.uniform(0.0, 2.0 * math.pi)) if shape != "circle" else 0.0
    low, high = (bound * size / REFERENCE_SIZE for bound in object_size)
    side = float(rng.uniform(low, high))
    lo, hi = _object_extent(shape, shape_param, angle)
    scale = side / float(np.max(hi - lo))
    # Keep the whole shape inside the image so its size is what was sampled.
    cx = float(rng.uniform(-lo[0] * scale, size - hi[0] * scale))
    cy = float(rng.uniform(-lo[1] * scale, size - hi[1] * scale))
    jitter = rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1, size=3)
    colour = np.clip(np.array(COLOURS[colour_name]) + jitter, 0, 255)
    return make_object(name, (cx, cy), side, angle, tuple(colour.tolist()), shape_param)


def _place_objects(
    rng: np.random.Generator,
    size: int,
    num_objects: int,
    classes: np.ndarray | None,
    object_size: tuple[float, float],
) -> list[SceneObject]:
    """Sample objects in drawing order, rejecting placements that hide too much of any
    object (a caption must only name objects that can be seen)."""
    if classes is None:
        classes = rng.choice(np.arange(1, len(CLASS_NAMES)), size=num_objects, replace=False)
    owner = np.full((size, size), -1, dtype=np.int64)
    objects: list[SceneObject] = []
    areas: list[int] = []
    for cls in classes:
        for _attempt in range(20):
            obj = _sample_object(rng, int(cls), size, object_size)
            mask, (c0, r0, c1, r1) = _centre_mask(obj, size)
            area = int(mask.sum())
            if area == 0:
                continue
            trial = owner.copy()
            trial[r0:r1, c0:c1][mask] = len(objects)
            visible = np.bincount(trial.reshape(-1) + 1, minlength=len(objects) + 2)[1:]
            if all(
                visible[k] >= MIN_VISIBLE_FRACTION * a for k, a in enumerate(areas + [area])
            ):
                owner = trial
                objects.append(obj)
                areas.append(area)
                break
    return objects


#: Caption templates without the background: ``{objects}`` is the listed objects.
_OBJECT_TEMPLATES = (
    "{objects}",
    "a photo of {objects}",
    "a picture of {objects}",
    "an image of {objects}",
    "there is {objects}",
    "a rendering of {objects}",
    "a scene with {objects}",
)
#: Templates naming the background too: ``{background}`` is e.g. "a dark brown textured
#: background" or "a plain background".
_BACKGROUND_TEMPLATES = (
    "{objects} on {background}",
    "a photo of {objects} on {background}",
    "a picture of {objects} in front of {background}",
    "{objects} against {background}",
    "there is {objects} on {background}",
    "{background} with {objects}",
    "an image of {objects} over {background}",
)
#: Probability that a caption names the background.
BACKGROUND_CAPTION_FRACTION = 0.6


def with_article(phrase: str) -> str:
    """``phrase`` with its indefinite article: "an orange star", "a red circle"."""
    return ("an " if phrase[:1].lower() in "aeiou" else "a ") + phrase


def describe_background(rng: np.random.Generator, look: BackgroundLook | None = None) -> str:
    """A noun phrase for the background, e.g. "a grey background", "a dark brown textured
    background", "a plain background" (random subset of ``look``'s words, article
    included). ``None`` describes it with no colour words."""
    look = look or BackgroundLook()
    words = []
    if look.tone and rng.random() < 0.5:
        words.append(look.tone)
    if rng.random() < 0.7:
        words.append(look.colour)
    if rng.random() < 0.5:
        words.append(look.texture)
    return with_article(" ".join([*words, "background"]))


def make_caption(
    rng: np.random.Generator,
    class_names: list[str],
    background: BackgroundLook | None = None,
) -> str:
    """An image-level caption naming each class in ``class_names`` once, in random order,
    and with probability :data:`BACKGROUND_CAPTION_FRACTION` the background.

    Example: ``["red circle", "orange star"]`` -> ``"a photo of an orange star and a red
    circle on a grey textured background."``. Articles follow the next word ("an orange",
    "a red"). ``background`` (how it looks) picks the background's words; default a plain
    grey one.
    """
    order = rng.permutation(len(class_names))
    phrases = [with_article(class_names[int(index)]) for index in order]
    if len(phrases) == 1:
        listed = phrases[0]
    else:
        listed = ", ".join(phrases[:-1]) + " and " + phrases[-1]
    if rng.random() < BACKGROUND_CAPTION_FRACTION:
        template = _BACKGROUND_TEMPLATES[int(rng.integers(len(_BACKGROUND_TEMPLATES)))]
        caption = template.format(objects=listed, background=describe_background(rng, background))
    else:
        template = _OBJECT_TEMPLATES[int(rng.integers(len(_OBJECT_TEMPLATES)))]
        caption = template.format(objects=listed)
    return caption + "." if rng.random() < 0.5 else caption


def rasterize_objects(
    objects: list[SceneObject],
    size: int,
    background: np.ndarray | None = None,
    supersample: int = 3,
) -> tuple[np.ndarray, np.ndarray]:
    """Draw ``objects`` in order over ``background``.

    Args:
        objects: drawing order, back to front.
        size: image side in pixels.
        background: ``(size, size, 3)`` float or uint8 RGB; mid grey when ``None``.
        supersample: odd number of sub-samples per pixel side for the anti-aliased image
            (1 = aliased); the middle sub-sample is the pixel centre.

    Returns:
        ``image`` ``(size, size, 3)`` uint8 and ``label`` ``(size, size)`` int64, where a
        pixel's label is the last object containing its centre (0 = background).
    """
    if background is None:
        image = np.full((size, size, 3), 128.0, dtype=np.float32)
    else:
        image = np.array(background, dtype=np.float32, copy=True)
    label = np.zeros((size, size), dtype=np.int64)
    for obj in objects:
        alpha, mask, (c0, r0, c1, r1) = _coverage_and_centre(obj, size, supersample)
        label[r0:r1, c0:c1][mask] = obj.class_id
        region = image[r0:r1, c0:c1]
        colour = np.asarray(obj.colour_rgb, dtype=np.float32)
        region += alpha[:, :, None] * (colour - region)
    return np.rint(image).astype(np.uint8), label


def render_scene(
    seed_or_rng: int | np.random.Generator | None = None,
    size: int = REFERENCE_SIZE,
    *,
    num_objects: int | None = None,
    classes: list[str] | None = None,
    noise: bool = True,
    supersample: int = 3,
    object_size: tuple[float, float] = OBJECT_SIZE_RANGE,
) -> Scene:
    """Render one scene.

    Args:
        seed_or_rng: an int seed or a ``numpy.random.Generator`` (consumed).
        size: image side in pixels; object sizes scale with ``size / 128``.
        num_objects: 1-4; random when ``None``.
        classes: object class names in drawing order (distinct); random when ``None``.
            Overrides ``num_objects``.
        noise: add mild noise to the background texture.
        supersample: odd number of sub-samples per pixel side for anti-aliased edges
            (1 = aliased).
        object_size: range of an object's bounding-box side at the reference size
            128 px (scaled by ``size / 128``); the spec's 20-56 px by default.

    Returns:
        A :class:`Scene` with ``image`` ``(size, size, 3)`` uint8 and ``label``
        ``(size, size)`` int64. Objects whose placement would hide more than half of an
        earlier object are re-sampled (and dropped after 20 tries), so a scene may hold
        fewer objects than requested, but always at least one.
    """
    rng = seed_or_rng if isinstance(seed_or_rng, np.random.Generator) else (
        np.random.default_rng(seed_or_rng)
    )
    if classes is not None:
        ids = np.array([class_id(name) for name in classes], dtype=np.int64)
        if len(set(ids.tolist())) != len(ids) or (ids == 0).any():
            raise ValueError("classes must be distinct object class names")
        num_objects = len(ids)
    else:
        ids = None
        if num_objects is None:
            num_objects = int(rng.integers(1, MAX_OBJECTS + 1))
    background, look = _background_and_look(rng, size, noise)
    objects = _place_objects(rng, size, num_objects, ids, object_size)
    image, label = rasterize_objects(objects, size, background, supersample)
    caption = make_caption(rng, [obj.class_name for obj in objects], look)
    return Scene(image, label, objects, caption)


def render_scenes(
    seed: int,
    n: int,
    size: int = REFERENCE_SIZE,
    *,
    start: int = 0,
    **scene_kwargs,
) -> SceneBatch:
    """Render scenes ``start .. start + n - 1`` of the stream identified by ``seed``.

    Scene ``i`` uses its own generator ``numpy.random.default_rng([seed, i])``, so any
    slice of the stream is reproducible on its own (batches can be rendered in any
    order or in parallel workers) and equals ``render_scene(default_rng([seed, i]))``.

    Returns:
        A :class:`SceneBatch`: ``images`` ``(n, size, size, 3)`` uint8, ``labels``
        ``(n, size, size)`` int64, per-scene object lists and captions.
    """
    images = np.empty((n, size, size, 3), dtype=np.uint8)
    labels = np.empty((n, size, size), dtype=np.int64)
    objects, captions = [], []
    for k in range(n):
        scene = render_scene(np.random.default_rng([seed, start + k]), size, **scene_kwargs)
        images[k], labels[k] = scene.image, scene.label
        objects.append(scene.objects)
        captions.append(scene.caption)
    return SceneBatch(images, labels, objects, captions)


def training_label(label: np.ndarray) -> np.ndarray:
    """Label map for segmentation training on seen classes: unseen-class pixels -> 255.

    Args:
        label: ``(..., H, W)`` integer class ids.

    Returns:
        A new int64 array of the same shape with :data:`UNSEEN_CLASSES` set to
        :data:`IGNORE_INDEX`.
    """
    out = np.array(label, dtype=np.int64, copy=True)
    out[np.isin(out, _UNSEEN_IDS)] = IGNORE_INDEX
    return out
