"""Segmentation datasets on disk: a plain folder format and COCO-Stuff-164k.

Folder format
-------------
::

    root/
      classes.txt            one class per line; "a, b" = synonyms of one class
      images/<stem>.jpg      (.jpg, .jpeg or .png; RGB, any PIL mode is converted)
      masks/<stem>.png       class ids per pixel, single channel

Masks become label maps by the rule of :mod:`onepass_ovs.data.files` (``int64 (H, W)``,
``IGNORE_INDEX`` for unlabelled and unseen pixels).

Items are ``{"image": uint8 (3, H, W) RGB, "label": int64 (H, W), "stem": str}``.
A transform is a sample transform, ``transform(sample, generator) -> sample`` (the
trainer's ``sample_transform`` protocol; augmenters in ``training.augment`` are such
callables). With ``seed`` set, ``generator`` is seeded from ``(seed, epoch, index)``
(:func:`sample_generator`), so an item is a pure function of those three numbers: any
worker count, any order and a resumed run draw identical crops. ``dataset[(epoch,
index)]`` passes the epoch explicitly (persistent workers, iteration-based samplers);
``dataset[index]`` uses the epoch set by :meth:`FolderDataset.set_epoch`. (With the
trainer, leave ``transform`` unset and hand the augmenter to the trainer, which seeds it
the same way.)
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from . import _LAZY, IGNORE_INDEX
from .classes import DatasetError, check_class_names, read_class_names, resolve_unseen
from .files import IMAGE_EXTENSIONS, read_image, read_label

# the package lists the names (it exports them lazily, without importing torch)
__all__ = list(_LAZY["datasets"])

SampleTransform = Callable[[dict, torch.Generator | None], dict]


def sample_seed(base_seed: int, epoch: int, index: int) -> int:
    """A well-mixed 63-bit seed for one sample of one epoch.

    ``SeedSequence`` hashes the triple, so neighbouring indices or epochs give
    unrelated streams (``base + index`` would make epoch e, index i+1 equal
    epoch e+1, index i under some schemes).
    """
    words = np.random.SeedSequence([int(base_seed), int(epoch), int(index)]).generate_state(2)
    return (int(words[0]) << 31) ^ int(words[1])


def sample_generator(base_seed: int, epoch: int, index: int) -> torch.Generator:
    """A CPU generator seeded with :func:`sample_seed`."""
    generator = torch.Generator()
    generator.manual_seed(sample_seed(base_seed, epoch, index))
    return generator


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
            check_class_names(class_names, "class_names")
        self.classes: list[str] = list(class_names)
        self.unseen_ids: list[int] = resolve_unseen(self.classes, unseen)
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

# The 15 unseen classes of the zero-shot protocol of ZS3Net, SimBaseline and DeOP
# (the other 156 are seen in training).
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
