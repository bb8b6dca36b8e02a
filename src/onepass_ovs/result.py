"""SegmentationResult: the label map of one image, with lazily computed probabilities."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .images import Geometry

UNKNOWN = -1
_EPS = 1e-8
_CLASS_CHUNK = 64  # classes resized at once: bounds memory for huge vocabularies
_BAND_BYTES = 32 * 2**20  # rows of the full-size maps made at once: bounds memory for huge images


def palette(num_colours: int = 256) -> np.ndarray:
    """A fixed, well-spread colour table (num_colours, 3) uint8.

    Bit-interleaved colours (the scheme of the PASCAL VOC label images), shifted by one so
    class 0 is not black; black is kept for "unknown".
    """
    ids = np.arange(1, num_colours + 1)
    colours = np.zeros((num_colours, 3), dtype=np.int64)
    c = ids.copy()
    for shift in range(7, -1, -1):
        for channel in range(3):
            colours[:, channel] |= ((c >> channel) & 1) << shift
        c >>= 3
    return colours.astype(np.uint8)


def upsample_scores(scores: torch.Tensor, geometry: Geometry) -> torch.Tensor:
    """(C, h, w) scores on the padded canvas -> (C, H0, W0) on the original image.

    Upsample to the padded size, crop the valid (resized) region, resize to the original.
    """
    hp, wp = geometry.padded
    h1, w1 = geometry.resized
    x = scores[None].float()
    if x.shape[-2:] != (hp, wp):
        x = F.interpolate(x, size=(hp, wp), mode="bilinear", align_corners=False)
    x = x[..., :h1, :w1]
    if (h1, w1) != geometry.original:
        x = F.interpolate(x, size=geometry.original, mode="bilinear", align_corners=False)
    return x[0]


def _linear_taps(n_in: int, n_out: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Source indices (i0, i1) and weight of i1 for 1-D linear resizing, align_corners=False
    (the sampling of ``F.interpolate(mode="bilinear")``)."""
    src = ((torch.arange(n_out, dtype=torch.float64) + 0.5) * (n_in / n_out) - 0.5).clamp_min(0)
    i0 = src.floor().long().clamp_max(n_in - 1)
    i1 = (i0 + 1).clamp_max(n_in - 1)
    return i0, i1, src - i0


def _axis_taps(n_in: int, n_pad: int, n_valid: int, n_out: int):
    """One axis of :func:`upsample_scores` as 4 taps per output cell.

    Resize n_in -> n_pad, keep the first n_valid, resize n_valid -> n_out. Returns indices
    into the n_in input cells (n_out, 4) and their weights (n_out, 4).
    """
    if n_in != n_pad:
        a0, a1, wa = _linear_taps(n_in, n_pad)
    else:
        a0 = a1 = torch.arange(n_in)
        wa = torch.zeros(n_in, dtype=torch.float64)
    if n_valid != n_out:
        b0, b1, wb = _linear_taps(n_valid, n_out)
    else:
        b0 = b1 = torch.arange(n_out)
        wb = torch.zeros(n_out, dtype=torch.float64)
    index = torch.stack([a0[b0], a1[b0], a0[b1], a1[b1]], 1)
    weight = torch.stack(
        [(1 - wa[b0]) * (1 - wb), wa[b0] * (1 - wb), (1 - wa[b1]) * wb, wa[b1] * wb], 1
    )
    return index, weight.float()


class _RowUpsampler:
    """:func:`upsample_scores`, one band of output rows at a time.

    Bilinear resizing is separable: each output row mixes at most 4 input rows, and each
    output column 4 input columns, so a band of full-size rows costs only its own memory.
    """

    def __init__(self, shape: tuple[int, int], geometry: Geometry):
        (h, w), (hp, wp), (h1, w1), (h0, w0) = (
            shape, geometry.padded, geometry.resized, geometry.original
        )
        self.rows_index, self.rows_weight = _axis_taps(h, hp, h1, h0)
        self.cols_index, self.cols_weight = _axis_taps(w, wp, w1, w0)

    def rows(self, scores, start: int, stop: int) -> torch.Tensor:
        """(C, h, w) low-resolution scores -> rows [start, stop) of the (C, H0, W0) map.

        ``scores`` is a tensor or a lazy score map (``rows(index) -> (1, C, n, w)``, e.g.
        DeOP's assembled scores), whose needed rows are computed once per band.
        """
        index, weight = self.rows_index[start:stop], self.rows_weight[start:stop]
        if not isinstance(scores, torch.Tensor):
            needed, index = index.unique(return_inverse=True)
            scores = scores.rows(needed)[0]
        band = sum(scores[:, index[:, t]] * weight[:, t, None] for t in range(4))
        index, weight = self.cols_index, self.cols_weight
        return sum(band[:, :, index[:, t]] * weight[:, t] for t in range(4))


def _band_rows(channels: int, width: int) -> int:
    return max(1, _BAND_BYTES // (4 * max(1, channels) * max(1, width)))


class SegmentationResult:
    """The segmentation of one image.

    Only the low-resolution scores are kept; full-size maps are made band by band, so a
    large photo costs its (H, W) label map plus a bounded working buffer.

    Attributes:
        label_map: (H, W) int32 class indices into ``classes`` at the input's size;
            -1 marks "unknown" (only with ``unknown_threshold``; with a background class
            those pixels get its index instead).
        classes: the vocabulary as given, order kept.
        probs: (K, H, W) float32 class probabilities (summing to 1 per pixel), computed on
            first access (K full-size maps: 24 MB per class for a 3000 x 2000 image).
    """

    def __init__(
        self,
        scores: torch.Tensor,
        classes: list[str],
        geometry: Geometry,
        unknown_threshold: float | None = None,
        unknown_label: int = UNKNOWN,
    ):
        """scores: (K, h, w) non-negative class scores on the padded canvas (any h, w).

        ``unknown_label``: the label of pixels below ``unknown_threshold`` (-1, or the
        index of a background class).
        """
        lazy = not isinstance(scores, torch.Tensor)
        count = scores.shape[1] if lazy else scores.shape[0]
        if count != len(classes):
            raise ValueError(f"{count} score maps for {len(classes)} classes")
        if not UNKNOWN <= unknown_label < len(classes):
            raise ValueError(f"unknown_label {unknown_label} is not -1 or a class index")
        self._scores = (
            scores.float().cpu() if lazy else scores.detach().float().cpu().clamp_min(0.0)
        )
        self.classes = list(classes)
        self.geometry = geometry
        self.unknown_threshold = unknown_threshold
        self.unknown_label = unknown_label
        self._upsampler = _RowUpsampler(tuple(self._scores.shape[-2:]), geometry)
        self._total = self._scores.class_sum() if lazy else self._scores.sum(0, keepdim=True)
        self.label_map = self._label_map()

    def _classes(self, start: int, stop: int):
        if isinstance(self._scores, torch.Tensor):
            return self._scores[start:stop]
        return self._scores.select(start, stop)

    @property
    def size(self) -> tuple[int, int]:
        """(H, W) of the input image."""
        return self.geometry.original

    def _label_map(self) -> np.ndarray:
        k = len(self.classes)
        h0, w0 = self.size
        labels = np.empty((h0, w0), dtype=np.int32)
        step = _band_rows(min(k, _CLASS_CHUNK), w0)
        for top in range(0, h0, step):
            bottom = min(top + step, h0)
            best_score = best_index = None
            for start in range(0, k, _CLASS_CHUNK):
                up = self._upsampler.rows(self._classes(start, start + _CLASS_CHUNK), top, bottom)
                value, index = up.max(0)
                if best_score is None:
                    best_score, best_index = value, index
                else:
                    better = value > best_score
                    best_score = torch.where(better, value, best_score)
                    best_index = torch.where(better, index + start, best_index)
            band = best_index.to(torch.int32)
            if self.unknown_threshold is not None:
                total = self._upsampler.rows(self._total, top, bottom)[0]
                best_prob = (best_score + _EPS) / (total + k * _EPS)
                band[best_prob < self.unknown_threshold] = self.unknown_label
            labels[top:bottom] = band.numpy()
        return labels

    @cached_property
    def probs(self) -> np.ndarray:
        """(K, H, W) float32 probabilities: scores normalised over classes."""
        k = len(self.classes)
        h0, w0 = self.size
        out = np.empty((k, h0, w0), dtype=np.float32)
        step = _band_rows(min(k, _CLASS_CHUNK), w0)
        for top in range(0, h0, step):
            bottom = min(top + step, h0)
            # the same total as the label map's unknown test, so thresholds agree exactly
            total = self._upsampler.rows(self._total, top, bottom)
            for start in range(0, k, _CLASS_CHUNK):
                up = self._upsampler.rows(self._classes(start, start + _CLASS_CHUNK), top, bottom)
                probs = (up + _EPS) / (total + k * _EPS)
                out[start : start + _CLASS_CHUNK, top:bottom] = probs.numpy()
        return out

    def masks(self) -> dict[str, np.ndarray]:
        """{class name: (H, W) bool} for every class present in the label map."""
        present = np.unique(self.label_map)
        return {self.classes[i]: self.label_map == i for i in present if i >= 0}

    def fractions(self) -> dict[str, float]:
        """{class name: fraction of pixels} for present classes, largest first."""
        ids, counts = np.unique(self.label_map, return_counts=True)
        total = self.label_map.size
        out = {
            ("unknown" if i < 0 else self.classes[i]): c / total
            for i, c in zip(ids.tolist(), counts.tolist(), strict=True)
        }
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))

    def colour_map(self) -> np.ndarray:
        """(H, W, 3) uint8 colour picture of the label map (unknown = black)."""
        k = len(self.classes)
        colours = np.concatenate([palette(k), np.zeros((1, 3), np.uint8)])
        return colours[np.where(self.label_map < 0, k, self.label_map)]

    def to_pil(self):
        """Label map as a PNG-ready image.

        Up to 255 classes: a palette ('P') image, pixel value = class index, 255 = unknown.
        More classes: a 16-bit greyscale ('I;16') image, 65535 = unknown.
        """
        from PIL import Image

        k = len(self.classes)
        if k <= 255:
            arr = np.where(self.label_map < 0, 255, self.label_map).astype(np.uint8)
            img = Image.fromarray(arr, mode="P") if _pil_takes_mode() else Image.fromarray(arr)
            if img.mode != "P":
                img = img.convert("P")
            table = np.zeros((256, 3), np.uint8)
            table[:k] = palette(k)
            img.putpalette(table.reshape(-1).tolist())
            return img
        if k > 65535:
            raise ValueError("label maps support at most 65535 classes")
        arr = np.where(self.label_map < 0, 65535, self.label_map).astype(np.uint16)
        return Image.fromarray(arr)

    def overlay(self, image, alpha: float = 0.5, image_format: str = "RGB"):
        """The image with class colours blended in (unknown pixels untouched) -> PIL RGB."""
        from PIL import Image

        from .images import to_tensor

        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        (rgb,) = to_tensor(image, image_format)[:1]
        base = (rgb.permute(1, 2, 0).numpy() * 255.0).round().astype(np.float32)
        if base.shape[:2] != self.label_map.shape:
            raise ValueError(
                f"image is {base.shape[1]}x{base.shape[0]} but the label map is "
                f"{self.label_map.shape[1]}x{self.label_map.shape[0]}: pass the segmented image"
            )
        colours = self.colour_map().astype(np.float32)
        known = (self.label_map >= 0)[..., None]
        blended = np.where(known, (1 - alpha) * base + alpha * colours, base)
        return Image.fromarray(blended.round().clip(0, 255).astype(np.uint8), "RGB")

    def save(self, path: str | Path) -> Path:
        """Save the label map: ``.png`` (see :meth:`to_pil`) or ``.npy`` (int32 array)."""
        path = Path(path)
        suffix = path.suffix.lower()
        if suffix == ".png":
            self.to_pil().save(path)
        elif suffix == ".npy":
            np.save(path, self.label_map)
        else:
            raise ValueError(f"save() writes .png or .npy label maps, not {suffix or 'no suffix'!r}")
        return path

    def __repr__(self) -> str:
        h, w = self.size
        present = ", ".join(f"{n} {f:.0%}" for n, f in list(self.fractions().items())[:5])
        return f"SegmentationResult({w}x{h}, {len(self.classes)} classes; {present})"

    # -- per-segment scores and ecosystem outputs -----------------------------------------
    def segment_scores(self) -> dict[int, float]:
        """{class index: score} for every class present in the label map.

        The score of a segment is the mean probability of its class over its own pixels
        (the pixels labelled with it, :attr:`probs` averaged there): 1.0 means every pixel
        of the segment was certain, 1/K means the model hesitated between all K classes.
        Computed band by band (no K x H x W array) unless :attr:`probs` is already made.
        """
        k = len(self.classes)
        present = [int(i) for i in np.unique(self.label_map) if i >= 0]
        if not present:
            return {}
        sums = np.zeros(k, dtype=np.float64)
        if "probs" in self.__dict__:  # already materialised: use it
            for i in present:
                sums[i] = self.probs[i][self.label_map == i].sum(dtype=np.float64)
        else:
            h0, w0 = self.size
            step = _band_rows(min(k, _CLASS_CHUNK), w0)
            for top in range(0, h0, step):
                bottom = min(top + step, h0)
                labels = torch.from_numpy(self.label_map[top:bottom]).long()
                total = self._upsampler.rows(self._total, top, bottom)
                for start in range(0, k, _CLASS_CHUNK):
                    chunk = [i for i in present if start <= i < start + _CLASS_CHUNK]
                    if not chunk:
                        continue
                    up = self._upsampler.rows(
                        self._classes(start, start + _CLASS_CHUNK), top, bottom
                    )
                    probs = (up + _EPS) / (total + k * _EPS)
                    for i in chunk:
                        sums[i] += probs[i - start][labels == i].double().sum().item()
        counts = np.bincount(self.label_map[self.label_map >= 0].ravel(), minlength=k)
        return {i: float(sums[i] / counts[i]) for i in present}

    def segments(self) -> list[dict]:
        """One dict per class present in the label map, in vocabulary order::

            {"label": str, "score": float, "mask": (H, W) bool ndarray,
             "class_id": int, "area": int (pixels)}

        ``score``: see :meth:`segment_scores` (the mean probability of the class over its
        pixels). Unknown pixels (-1) belong to no segment.
        """
        scores = self.segment_scores()
        out = []
        for i, score in sorted(scores.items()):
            mask = self.label_map == i
            out.append({
                "label": self.classes[i], "score": score, "mask": mask,
                "class_id": i, "area": int(mask.sum()),
            })
        return out

    def to_records(self) -> list[dict]:
        """The output of a transformers ``image-segmentation`` pipeline: a list of
        ``{"score": float, "label": str, "mask": PIL.Image}`` (mode ``"L"``, 255 inside the
        segment, 0 outside), one per present class in vocabulary order; scores as in
        :meth:`segments`."""
        from PIL import Image

        return [
            {
                "score": seg["score"],
                "label": seg["label"],
                "mask": Image.fromarray(seg["mask"].astype(np.uint8) * 255).convert("L"),
            }
            for seg in self.segments()
        ]

    def to_supervision(self):
        """The segments as ``supervision.Detections`` (needs ``pip install onepass-ovs
        [supervision]``): ``mask`` (N, H, W) bool, ``xyxy`` (N, 4) the masks' bounding boxes
        (x1, y1, x2, y2 in pixels, inclusive of the last pixel + 1), ``class_id`` (N,) indices
        into :attr:`classes`, ``confidence`` (N,) the segment scores (:meth:`segments`), and
        ``data["class_name"]`` (N,) the class names; one detection per present class."""
        try:
            import supervision as sv
        except ImportError as err:
            raise ImportError(
                "to_supervision() needs supervision: pip install 'onepass-ovs[supervision]'"
            ) from err
        segs = self.segments()
        h, w = self.size
        if not segs:
            return sv.Detections(
                xyxy=np.zeros((0, 4), np.float32), mask=np.zeros((0, h, w), bool),
                confidence=np.zeros(0, np.float32), class_id=np.zeros(0, int),
                data={"class_name": np.array([], dtype=str)},
            )
        masks = np.stack([s["mask"] for s in segs])
        boxes = []
        for mask in masks:
            ys, xs = np.nonzero(mask.any(1))[0], np.nonzero(mask.any(0))[0]
            boxes.append([xs[0], ys[0], xs[-1], ys[-1]])
        return sv.Detections(
            xyxy=np.asarray(boxes, np.float32),
            mask=masks,
            confidence=np.asarray([s["score"] for s in segs], np.float32),
            class_id=np.asarray([s["class_id"] for s in segs], int),
            data={"class_name": np.asarray([s["label"] for s in segs])},
        )


def _pil_takes_mode() -> bool:
    # Pillow >= 11 deprecates the mode argument of fromarray for 2-D uint8 arrays.
    import PIL

    major = int(PIL.__version__.split(".")[0])
    return major < 11
