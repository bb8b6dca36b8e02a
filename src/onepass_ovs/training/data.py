"""Segmentation datasets on disk: a plain folder format and COCO-Stuff-164k.

Folder format
-------------
::

    root/
      classes.txt            one class per line; "a, b" = synonyms of one class
      images/<stem>.jpg      (.jpg, .jpeg or .png; RGB, any PIL mode is converted)
      masks/<stem>.png       class ids per pixel, single channel

Label rule (files and memory)
-----------------------------
- In memory a label map is always ``int64`` of shape ``(H, W)``; a pixel is a class id
  in ``[0, num_classes)`` or ``IGNORE_INDEX = -1``. One sentinel for every vocabulary
  size: -1 can never collide with a class id, whereas 255 does above 255 classes.
- On disk a mask is an 8-bit PNG (mode ``L`` or ``P``) whose value 255 means ignore
  (ids 0..254), or a 16-bit PNG (mode ``I;16``) whose value 65535 means ignore (ids
  0..65534; needed above 255 classes). Both map to ``IGNORE_INDEX`` on read, and
  :func:`save_label_png` writes the inverse. A 16-bit file's 255 is class 255, not
  ignore: the ignore value follows the file's bit depth, never the class count.
- Unseen classes (the open-vocabulary protocol) become ``IGNORE_INDEX`` on read.
- Masks are aligned with the stored pixel grid: EXIF orientation is *not* applied to
  images here, because masks carry no EXIF and were drawn on the stored pixels.

Items are ``{"image": uint8 (3, H, W) RGB, "label": int64 (H, W), "stem": str}``.
A transform is a sample transform, ``transform(sample, generator) -> sample`` (the
trainer's ``sample_transform`` protocol; augmenters in ``training.augment`` are such
callables). With ``seed`` set, ``generator`` is seeded from ``(seed, epoch, index)``, so
an item is a pure function of those three numbers: any worker count, any order and a
resumed run draw identical crops. ``dataset[(epoch, index)]`` passes the epoch
explicitly (persistent workers, iteration-based samplers); ``dataset[index]`` uses the
epoch set by :meth:`FolderDataset.set_epoch`. (With the trainer, leave ``transform``
unset and hand the augmenter to the trainer, which seeds it the same way.)
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from onepass_ovs.training import IGNORE_INDEX
from onepass_ovs.training.augment import sample_generator

__all__ = [
    "IGNORE_INDEX",
    "IMAGE_EXTENSIONS",
    "COCO_STUFF_CLASSES",
    "COCO_STUFF_UNSEEN",
    "DatasetError",
    "FolderDataset",
    "CocoStuffDataset",
    "RegionDataset",
    "read_class_names",
    "class_synonyms",
    "read_image",
    "read_label",
    "save_label_png",
    "collate",
    "semantic_to_instances",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
_FILE_IGNORE_8BIT = 255
_FILE_IGNORE_16BIT = 65535

SampleTransform = Callable[[dict, torch.Generator | None], dict]


class DatasetError(ValueError):
    """A dataset file is missing, unreadable or inconsistent; the message names it."""


# --------------------------------------------------------------------------- files


def class_synonyms(name: str) -> list[str]:
    """Names of one class: ``"sofa, couch"`` -> ``["sofa", "couch"]``."""
    return [part.strip() for part in name.split(",") if part.strip()]


def read_class_names(path: str | os.PathLike) -> list[str]:
    """Class names from a ``classes.txt``, one per line, as written (stripped).

    Trailing blank lines are allowed; a blank line before the last class is an error
    because it would silently shift every following class id.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"class list not found: {path}")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise DatasetError(f"cannot read class list {path}: {err}") from err
    while lines and not lines[-1].strip():
        lines.pop()
    names = [line.strip() for line in lines]
    for line_no, name in enumerate(names, start=1):
        if not class_synonyms(name):
            raise DatasetError(f"{path}:{line_no}: empty class name")
    if not names:
        raise DatasetError(f"class list is empty: {path}")
    _check_unique(names, str(path))
    return names


def _check_unique(names: Sequence[str], where: str) -> None:
    seen: dict[str, int] = {}
    for class_id, name in enumerate(names):
        for synonym in class_synonyms(name):
            key = synonym.lower()
            if key in seen and seen[key] != class_id:
                raise DatasetError(
                    f"{where}: name {synonym!r} used by class {seen[key]} and class {class_id}"
                )
            seen[key] = class_id


def read_image(path: str | os.PathLike) -> torch.Tensor:
    """Read an image file as uint8 RGB ``(3, H, W)``; any PIL mode is converted."""
    try:
        with Image.open(path) as img:
            rgb = np.asarray(img.convert("RGB"))
    except (OSError, UnidentifiedImageError, ValueError) as err:
        raise DatasetError(f"cannot read image {path}: {err}") from err
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1).contiguous()


def _read_mask_file(path: Path) -> tuple[np.ndarray, int]:
    """Raw mask values ``(H, W)`` and the file's ignore value (by bit depth)."""
    try:
        with Image.open(path) as img:
            mode = img.mode
            raw = np.asarray(img)
    except (OSError, UnidentifiedImageError, ValueError) as err:
        raise DatasetError(f"cannot read mask {path}: {err}") from err
    if mode in ("L", "P"):
        return raw.astype(np.int64), _FILE_IGNORE_8BIT
    if mode == "1":
        return raw.astype(np.int64), _FILE_IGNORE_8BIT
    if mode.startswith("I;16") or mode == "I":
        return raw.astype(np.int64), _FILE_IGNORE_16BIT
    raise DatasetError(
        f"mask {path} has PIL mode {mode!r}; expected a single-channel 8-bit (L/P) "
        "or 16-bit (I;16) PNG of class ids"
    )


def read_label(
    path: str | os.PathLike,
    num_classes: int,
    *,
    unseen_ids: Iterable[int] = (),
) -> torch.Tensor:
    """Read a mask file as an int64 label map ``(H, W)`` following the module's rule.

    Values ``>= num_classes`` (other than the file's ignore value) are an error naming
    the file and the offending ids; ``unseen_ids`` become ``IGNORE_INDEX``.
    """
    path = Path(path)
    raw, file_ignore = _read_mask_file(path)
    valid = raw != file_ignore
    beyond = valid & (raw >= num_classes)
    if beyond.any():
        bad = np.unique(raw[beyond])[:10].tolist()
        hint = " (16-bit masks use 65535 for ignore)" if file_ignore == _FILE_IGNORE_16BIT else ""
        raise DatasetError(
            f"mask {path} has class ids {bad} beyond the {num_classes} classes{hint}"
        )
    label = np.where(valid, raw, IGNORE_INDEX)
    unseen = np.fromiter(unseen_ids, dtype=np.int64)
    if unseen.size:
        label[np.isin(label, unseen)] = IGNORE_INDEX
    return torch.from_numpy(label)


def save_label_png(path: str | os.PathLike, label: torch.Tensor | np.ndarray) -> None:
    """Write a label map ``(H, W)`` (ids and ``IGNORE_INDEX``) as a mask PNG.

    8-bit when every id is below 255, otherwise 16-bit; ignore becomes 255 / 65535.
    """
    arr = label.detach().cpu().numpy() if isinstance(label, torch.Tensor) else np.asarray(label)
    if arr.ndim != 2:
        raise ValueError(f"label must be (H, W), got shape {arr.shape}")
    arr = arr.astype(np.int64)
    ids = arr[arr != IGNORE_INDEX]
    if ids.size and (ids.min() < 0 or ids.max() >= _FILE_IGNORE_16BIT):
        raise ValueError(f"label ids must lie in [0, 65535) or be {IGNORE_INDEX}")
    if ids.size == 0 or ids.max() < _FILE_IGNORE_8BIT:
        out = np.where(arr == IGNORE_INDEX, _FILE_IGNORE_8BIT, arr).astype(np.uint8)
    else:
        out = np.where(arr == IGNORE_INDEX, _FILE_IGNORE_16BIT, arr).astype(np.uint16)
    Image.fromarray(out).save(path, format="PNG")


def _resolve_unseen(class_names: Sequence[str], unseen: Iterable[str] | None) -> list[int]:
    """Class ids of the given names (any synonym, case-insensitive); unknown = error."""
    if unseen is None:
        return []
    if isinstance(unseen, str):
        raise TypeError("unseen must be an iterable of class names, not a single string")
    lookup: dict[str, int] = {}
    for class_id, name in enumerate(class_names):
        for synonym in class_synonyms(name):
            lookup[synonym.lower()] = class_id
    ids: set[int] = set()
    for name in unseen:
        key = name.strip().lower()
        if key not in lookup:
            raise DatasetError(f"unseen class {name!r} is not in the class list")
        ids.add(lookup[key])
    return sorted(ids)


# --------------------------------------------------------------------------- datasets


class FolderDataset(Dataset):
    """Images and masks in two folders, paired by file stem.

    Args:
        root: dataset folder.
        unseen: class names whose pixels become ``IGNORE_INDEX`` (matched against every
            synonym, case-insensitive); an unknown name is an error.
        transform: sample transform ``transform(sample, generator) -> sample``.
        seed: base seed of the per-item generator; ``None`` lets the transform draw from
            torch's global generator.
        image_dir, mask_dir: folders relative to ``root``.
        class_names: the classes; ``None`` reads ``root/classes.txt``.

    Pairing (every image has a mask) is checked here; decoding, sizes and ids are
    checked per item, or for all items at once by :meth:`validate`.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        *,
        unseen: Iterable[str] | None = None,
        transform: SampleTransform | None = None,
        seed: int | None = None,
        image_dir: str = "images",
        mask_dir: str = "masks",
        class_names: Sequence[str] | None = None,
    ) -> None:
        self.root = Path(root)
        if class_names is None:
            class_names = read_class_names(self.root / "classes.txt")
        else:
            _check_unique(class_names, "class_names")
        self.classes: list[str] = list(class_names)
        self.unseen_ids: list[int] = _resolve_unseen(self.classes, unseen)
        self.transform = transform
        self.seed = seed
        self.epoch = 0
        self.ignore_index = IGNORE_INDEX
        self.image_dir = self.root / image_dir
        self.mask_dir = self.root / mask_dir
        self._images, self._masks = self._pair_files()

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def seen_ids(self) -> list[int]:
        unseen = set(self.unseen_ids)
        return [i for i in range(self.num_classes) if i not in unseen]

    def _pair_files(self) -> tuple[list[Path], list[Path]]:
        if not self.image_dir.is_dir():
            raise DatasetError(f"image folder not found: {self.image_dir}")
        if not self.mask_dir.is_dir():
            raise DatasetError(f"mask folder not found: {self.mask_dir}")
        images: dict[str, Path] = {}
        with os.scandir(self.image_dir) as entries:
            for entry in entries:
                stem, ext = os.path.splitext(entry.name)
                if ext.lower() not in IMAGE_EXTENSIONS or not entry.is_file():
                    continue
                if stem in images:
                    raise DatasetError(
                        f"two images share the stem {stem!r}: {images[stem]} and {entry.path}"
                    )
                images[stem] = Path(entry.path)
        if not images:
            raise DatasetError(f"no {'/'.join(IMAGE_EXTENSIONS)} images in {self.image_dir}")
        with os.scandir(self.mask_dir) as entries:
            mask_names = {e.name for e in entries}
        stems = sorted(images)
        missing = [s for s in stems if f"{s}.png" not in mask_names]
        if missing:
            raise DatasetError(
                f"image {images[missing[0]]} has no mask {self.mask_dir / (missing[0] + '.png')}"
                + (f" ({len(missing) - 1} more images without masks)" if len(missing) > 1 else "")
            )
        return [images[s] for s in stems], [self.mask_dir / f"{s}.png" for s in stems]

    def __len__(self) -> int:
        return len(self._images)

    def stem(self, index: int) -> str:
        return self._images[index].stem

    def set_epoch(self, epoch: int) -> None:
        """Epoch mixed into the per-item seed of ``dataset[index]``."""
        self.epoch = int(epoch)

    def load(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Decoded and checked ``(image uint8 (3, H, W), label int64 (H, W))``, no transform."""
        image = read_image(self._images[index])
        label = read_label(self._masks[index], self.num_classes, unseen_ids=self.unseen_ids)
        if tuple(image.shape[1:]) != tuple(label.shape):
            raise DatasetError(
                f"size mismatch: image {self._images[index]} is "
                f"{image.shape[2]}x{image.shape[1]} but mask {self._masks[index]} is "
                f"{label.shape[1]}x{label.shape[0]} (width x height)"
            )
        return image, label

    def generator(self, index: int, epoch: int | None = None) -> torch.Generator | None:
        """The per-item generator, or ``None`` when no seed is set."""
        if self.seed is None:
            return None
        return sample_generator(self.seed, self.epoch if epoch is None else epoch, index)

    def _resolve_key(self, key: int | tuple[int, int]) -> tuple[int, int | None]:
        epoch, index = (None, key) if isinstance(key, int | np.integer) else key
        index = int(index)
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        return index, epoch

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        """``dataset[index]`` or ``dataset[(epoch, index)]``."""
        index, epoch = self._resolve_key(key)
        image, label = self.load(index)
        sample = {"image": image, "label": label, "stem": self.stem(index)}
        if self.transform is not None:
            sample = self.transform(sample, self.generator(index, epoch))
        return sample

    def validate(self, progress: Callable[[Iterable], Iterable] | None = None) -> None:
        """Decode every item and raise the first error (naming its file).

        ``progress`` may wrap the index range (e.g. ``tqdm``) on long datasets.
        """
        indices: Iterable[int] = range(len(self))
        if progress is not None:
            indices = progress(indices)
        for index in indices:
            self.load(index)


# The 171 COCO-Stuff-164k classes in the order of the detectron2-prepared maps
# (stuffthingmaps_detectron2): 80 things then 91 stuff, ids 0..170.
COCO_STUFF_CLASSES: tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck",
    "boat", "traffic light", "fire hydrant", "stop sign", "parking meter", "bench",
    "bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra",
    "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee", "skis",
    "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard",
    "surfboard", "tennis racket", "bottle", "wine glass", "cup", "fork", "knife",
    "spoon", "bowl", "banana", "apple", "sandwich", "orange", "broccoli", "carrot",
    "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant", "bed",
    "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard",
    "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book",
    "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
    "banner", "blanket", "branch", "bridge", "building-other", "bush", "cabinet",
    "cage", "cardboard", "carpet", "ceiling-other", "ceiling-tile", "cloth", "clothes",
    "clouds", "counter", "cupboard", "curtain", "desk-stuff", "dirt", "door-stuff",
    "fence", "floor-marble", "floor-other", "floor-stone", "floor-tile", "floor-wood",
    "flower", "fog", "food-other", "fruit", "furniture-other", "grass", "gravel",
    "ground-other", "hill", "house", "leaves", "light", "mat", "metal", "mirror-stuff",
    "moss", "mountain", "mud", "napkin", "net", "paper", "pavement", "pillow",
    "plant-other", "plastic", "platform", "playingfield", "railing", "railroad",
    "river", "road", "rock", "roof", "rug", "salad", "sand", "sea", "shelf",
    "sky-other", "skyscraper", "snow", "solid-other", "stairs", "stone", "straw",
    "structural-other", "table", "tent", "textile-other", "towel", "tree", "vegetable",
    "wall-brick", "wall-concrete", "wall-other", "wall-panel", "wall-stone",
    "wall-tile", "wall-wood", "water-other", "waterdrops", "window-blind",
    "window-other", "wood",
)  # fmt: skip

# The zero-shot split of the ZS3/SimBaseline/DeOP protocol (METHODS.md 1.1.3).
COCO_STUFF_UNSEEN: tuple[str, ...] = (
    "cow", "giraffe", "suitcase", "frisbee", "skateboard", "carrot", "scissors",
    "cardboard", "clouds", "grass", "playingfield", "river", "road", "tree",
    "wall-concrete",
)  # fmt: skip


class CocoStuffDataset(FolderDataset):
    """COCO-Stuff-164k in its detectron2-prepared layout::

        root/images/{train2017,val2017}/*.jpg
        root/stuffthingmaps_detectron2/{train2017,val2017}/*.png   (ids 0..170, 255 ignore)

    ``unseen=COCO_STUFF_UNSEEN`` gives the zero-shot training split (156 seen classes);
    the default ``None`` keeps all 171 classes labelled (evaluation).
    """

    SPLITS = ("train2017", "val2017")

    def __init__(
        self,
        root: str | os.PathLike,
        split: str,
        *,
        unseen: Iterable[str] | None = None,
        transform: SampleTransform | None = None,
        seed: int | None = None,
    ) -> None:
        if split not in self.SPLITS:
            raise ValueError(f"split must be one of {self.SPLITS}, got {split!r}")
        self.split = split
        super().__init__(
            root,
            unseen=unseen,
            transform=transform,
            seed=seed,
            image_dir=f"images/{split}",
            mask_dir=f"stuffthingmaps_detectron2/{split}",
            class_names=COCO_STUFF_CLASSES,
        )


class RegionDataset(Dataset):
    """One item per ground-truth region, for prompt learning (DeOP stage 1).

    Item: ``{"image": uint8 (3, H, W), "label": int64 (H, W), "class_id": int,
    "stem": str}``; crop it with :class:`~onepass_ovs.training.augment.RegionCrop` (as
    ``transform`` here, or as the trainer's ``sample_transform``). Unseen classes are
    already ignore in ``dataset``'s labels, so they never form a region.

    Args:
        dataset: a :class:`FolderDataset`; its own ``transform`` is not used.
        regions: ``(image index, class id)`` pairs; ``None`` scans every label once
            (:meth:`index_regions`, slow on large datasets: save and pass the list).
        transform, seed: as for :class:`FolderDataset`.
    """

    def __init__(
        self,
        dataset: FolderDataset,
        regions: Sequence[tuple[int, int]] | None = None,
        *,
        min_pixels: int = 1,
        transform: SampleTransform | None = None,
        seed: int | None = None,
    ) -> None:
        self.dataset = dataset
        if regions is None:
            regions = self.index_regions(dataset, min_pixels=min_pixels)
        self.regions = [(int(i), int(c)) for i, c in regions]
        self.transform = transform
        self.seed = seed
        self.epoch = 0

    @staticmethod
    def index_regions(dataset: FolderDataset, *, min_pixels: int = 1) -> list[tuple[int, int]]:
        """Every ``(image index, class id)`` with at least ``min_pixels`` pixels."""
        regions = []
        for index in range(len(dataset)):
            _, label = dataset.load(index)
            ids, counts = torch.unique(label[label != IGNORE_INDEX], return_counts=True)
            regions += [
                (index, int(c)) for c, n in zip(ids, counts, strict=True) if n >= min_pixels
            ]
        return regions

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.regions)

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        """``dataset[index]`` or ``dataset[(epoch, index)]``."""
        epoch, index = (self.epoch, key) if isinstance(key, int | np.integer) else key
        image_index, class_id = self.regions[int(index)]
        image, label = self.dataset.load(image_index)
        sample = {
            "image": image,
            "label": label,
            "class_id": class_id,
            "stem": self.dataset.stem(image_index),
        }
        if self.transform is not None:
            generator = None
            if self.seed is not None:
                generator = sample_generator(self.seed, epoch, int(index))
            sample = self.transform(sample, generator)
        return sample


# --------------------------------------------------------------------------- batching


def collate(batch: Sequence[dict]) -> dict:
    """Stack equal-size items: ``image`` -> float ``(B, 3, S, S)`` in [0, 1],
    ``label`` -> int64 ``(B, S, S)``; other tensors are stacked, other values listed.
    """
    if not batch:
        raise ValueError("cannot collate an empty batch")
    out: dict = {}
    for key in batch[0]:
        values = [item[key] for item in batch]
        if isinstance(values[0], torch.Tensor):
            shapes = {tuple(v.shape) for v in values}
            if len(shapes) > 1:
                raise ValueError(
                    f"collate needs equal-size {key!r} tensors, got shapes {sorted(shapes)}; "
                    "crop to a fixed size first"
                )
            stacked = torch.stack(values)
            if key == "image" and stacked.dtype == torch.uint8:
                stacked = stacked.float().div_(255.0)
            out[key] = stacked
        elif isinstance(values[0], int | float) and not isinstance(values[0], bool):
            out[key] = torch.tensor(values)
        else:
            out[key] = values
    return out


def semantic_to_instances(
    label: torch.Tensor, ignore_index: int = IGNORE_INDEX
) -> tuple[torch.Tensor, torch.Tensor]:
    """One binary mask per present class of a label map ``(H, W)``.

    Returns ``classes`` int64 ``(T,)`` ascending and ``masks`` bool ``(T, H, W)``;
    ignore pixels belong to no mask.
    """
    if label.dim() != 2:
        raise ValueError(f"label must be (H, W), got shape {tuple(label.shape)}")
    classes = torch.unique(label)
    classes = classes[classes != ignore_index].long()
    masks = label.unsqueeze(0) == classes.view(-1, 1, 1)
    return classes, masks
