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
_PRUNE_MIN_CLASSES = 2  # label maps of fewer classes upsample every class
_MERGE_ROWS = 24
# Label maps of assembled scores (DeOP, GKC): square tiles of output pixels, coarse to fine,
# on which classes that cannot win are dropped; the survivors of the finest are scored exactly
_ASSEMBLED_TILES = (32, 16, 8, 4, 2)
_ASSEMBLED_DENSE_CLASSES = 4  # up to this many classes, every class is scored at every pixel
_ASSEMBLED_BYTES = 16 * 2**20  # bound-and-score work arrays made at once
_ASSEMBLED_BAND_BYTES = 4 * 2**20  # mask maps resized at once (rows of 32-pixel tiles)
_ASSEMBLED_MAX_PAIRS = 2**21  # more surviving (tile, class) pairs than this: score densely
_ASSEMBLED_DENSER = 6  # bound by matrix products when that makes at most this many x the bounds
_PRUNE_BYTES = 16 * 2**20  # low-resolution window max/min computed this many bytes at a time
# Relative slack on the "can this class win" bound: the blended scores are float32 sums
# whose rounding can stray a few ulps beyond the exact convex combination.
_PRUNE_MARGIN = 1e-4


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


def _name_key(name: str) -> str:
    import unicodedata

    return unicodedata.normalize("NFC", " ".join(name.split())).lower()


def _hue_of(name: str) -> float:
    import hashlib

    digest = hashlib.blake2b(_name_key(name).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


_MIN_HUE_GAP = 0.06  # hues closer than this (of a turn) are nudged apart


def class_colours(classes) -> np.ndarray:
    """(K, 3) uint8 colours for class names: each from a hash of its name, not its index.

    A class keeps its colour whatever the vocabulary's order. Hues come from the name;
    when two names of the vocabulary land on nearly the same hue, the later one in sorted
    name order is nudged by the golden angle (so the result depends on the set of names,
    never their order). Colours are saturated and bright; black is kept for "unknown".
    """
    import colorsys

    names = list(classes)
    order = sorted(range(len(names)), key=lambda i: (_name_key(names[i]), names[i]))
    hues: list[float] = []
    out = np.zeros((len(names), 3), dtype=np.uint8)
    for i in order:
        hue = _hue_of(names[i])
        for _ in range(16):  # few tries: with many classes hues must crowd anyway
            if all(min(abs(hue - h), 1 - abs(hue - h)) >= _MIN_HUE_GAP for h in hues):
                break
            hue = (hue + 0.381966) % 1.0
        hues.append(hue)
        # saturation / value vary a little with the name too, for more distinct colours
        shade = int(_hue_of("shade:" + names[i]) * 4)
        saturation = (0.95, 0.8, 0.65, 0.9)[shade]
        value = (0.95, 0.85, 1.0, 0.75)[shade]
        rgb = colorsys.hsv_to_rgb(hue, saturation, value)
        out[i] = [round(c * 255) for c in rgb]
    return out


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


def _linear_taps(n_in: int, n_out: int):
    """Source indices (i0, i1), weight of i1 and a "clamped at the start" flag for 1-D
    linear resizing, align_corners=False (the sampling of ``F.interpolate(mode="bilinear")``)."""
    raw = (torch.arange(n_out, dtype=torch.float64) + 0.5) * (n_in / n_out) - 0.5
    src = raw.clamp_min(0)
    i0 = src.floor().long().clamp_max(n_in - 1)
    i1 = (i0 + 1).clamp_max(n_in - 1)
    return i0, i1, src - i0, raw < 0


def _axis_taps(n_in: int, n_pad: int, n_valid: int, n_out: int):
    """One axis of :func:`upsample_scores` as 4 taps per output cell.

    Resize n_in -> n_pad, keep the first n_valid, resize n_valid -> n_out. Returns indices
    into the n_in input cells (n_out, 4), their weights (n_out, 4), and a piece key
    (n_out, 3): along a run of equal keys the 4 indices are fixed and the weights are
    affine in the output position (so a blended score is linear along the run).
    """
    if n_in != n_pad:
        a0, a1, wa, clamped_a = _linear_taps(n_in, n_pad)
    else:
        a0 = a1 = torch.arange(n_in)
        wa = torch.zeros(n_in, dtype=torch.float64)
        clamped_a = torch.zeros(n_in, dtype=torch.bool)
    if n_valid != n_out:
        b0, b1, wb, clamped_b = _linear_taps(n_valid, n_out)
        # the first-stage weights at b0, b1 are constants: only wb varies (affinely)
        key = torch.stack([b0, b1, clamped_b.long()], 1)
    else:
        b0 = b1 = torch.arange(n_out)
        wb = torch.zeros(n_out, dtype=torch.float64)
        key = torch.stack([a0[b0], a1[b0], clamped_a[b0].long()], 1)
    index = torch.stack([a0[b0], a1[b0], a0[b1], a1[b1]], 1)
    weight = torch.stack(
        [(1 - wa[b0]) * (1 - wb), wa[b0] * (1 - wb), (1 - wa[b1]) * wb, wa[b1] * wb], 1
    )
    return index, weight.float(), key


def _runs(key: torch.Tensor) -> list[tuple[int, int]]:
    """[start, stop) runs of consecutive equal rows of ``key`` (n, m)."""
    n = key.shape[0]
    if n == 0:
        return []
    change = (key[1:] != key[:-1]).any(1).nonzero()[:, 0] + 1
    starts = [0, *change.tolist()]
    return list(zip(starts, [*starts[1:], n], strict=True))


class _RowUpsampler:
    """:func:`upsample_scores`, one band of output rows at a time.

    Bilinear resizing is separable: each output row mixes at most 4 input rows, and each
    output column 4 input columns, so a band of full-size rows costs only its own memory.
    """

    def __init__(self, shape: tuple[int, int], geometry: Geometry):
        (h, w), (hp, wp), (h1, w1), (h0, w0) = (
            shape, geometry.padded, geometry.resized, geometry.original
        )
        self.rows_index, self.rows_weight, self.rows_key = _axis_taps(h, hp, h1, h0)
        self.cols_index, self.cols_weight, self.cols_key = _axis_taps(w, wp, w1, w0)
        # output column j is input column j (no resize): the column taps can be skipped
        self.cols_identity = bool(
            w0 <= w
            and torch.equal(self.cols_index[:, 0], torch.arange(w0))
            and bool((self.cols_weight[:, 0] == 1).all())
        )
        used = (self.cols_weight != 0).any(0)  # taps that carry weight in some column
        used[0] = True
        self._used_col_taps = used.nonzero().flatten().tolist()
        # fixed per geometry (not per band), so a value never depends on the band it is in
        self._cols_first = h < h0

    def rows(self, scores, start: int, stop: int) -> torch.Tensor:
        """(C, h, w) low-resolution scores -> rows [start, stop) of the (C, H0, W0) map.

        ``scores`` is a tensor or a lazy score map (``rows(index) -> (1, C, n, w)``, e.g.
        DeOP's assembled scores at the canvas resolution), whose needed rows are computed
        once per band.
        """
        if isinstance(scores, torch.Tensor):
            return self.at(scores, slice(start, stop), slice(None))
        index = self.rows_index[start:stop]
        weight = self.rows_weight[start:stop]
        used = (weight != 0).any(0)  # taps with weight anywhere in the band
        used[0] = True
        needed, local = torch.unique(index[:, used], return_inverse=True)
        block = scores.rows(needed)[0]  # (C, n, w)
        if self._cols_first:  # fewer input rows than output rows: resize the columns first
            block = self._columns(block)
        taps = used.nonzero().flatten().tolist()
        band = sum(block.index_select(1, local[:, i]) * weight[:, t, None] for i, t in enumerate(taps))
        return band if self._cols_first else self._columns(band)

    def _columns(self, band: torch.Tensor) -> torch.Tensor:
        """(C, n, w) -> (C, n, W0): the column taps that carry weight, or the identity."""
        if self.cols_identity:
            return band[:, :, : len(self.cols_index)]
        index, weight = self.cols_index, self.cols_weight
        return sum(band.index_select(2, index[:, t]) * weight[:, t] for t in self._used_col_taps)

    def at(self, scores: torch.Tensor, rows, cols, classes: torch.Tensor | None = None) -> torch.Tensor:
        """(C, h, w) -> (C, len(rows), len(cols)) full-size scores at the given output rows
        and columns (slices or index tensors), bit-identical to :meth:`rows` there.

        ``classes``: only these score maps (gathering just the cell rows needed).
        """
        index, weight = self.rows_index[rows], self.rows_weight[rows]
        if classes is not None:
            needed, local = torch.unique(index, return_inverse=True)
            scores = scores[classes[:, None], needed[None, :]]  # (U, cells needed, w)
            index = local.view(index.shape)
        band = scores.index_select(1, index[:, 0]) * weight[:, 0, None]
        for t in range(1, 4):
            band = band + scores.index_select(1, index[:, t]) * weight[:, t, None]
        index, weight = self.cols_index[cols], self.cols_weight[cols]
        out = band.index_select(2, index[:, 0]) * weight[:, 0]
        for t in range(1, 4):
            out = out + band.index_select(2, index[:, t]) * weight[:, t]
        return out


def _window_positions(index: torch.Tensor, weight: torch.Tensor, n_in: int):
    """Per output cell, the first input cell of a fixed-size window holding all its taps.

    index, weight: (n_out, 4) taps of :func:`_axis_taps`. Returns (positions (n_out,) long,
    window size). Taps with zero weight are ignored; windows are clamped inside [0, n_in).
    """
    used = weight > 0
    big = torch.full_like(index, n_in)
    low = torch.where(used, index, big).min(1).values
    high = torch.where(used, index, torch.full_like(index, -1)).max(1).values
    low = torch.where(high < 0, index[:, 0], low)  # no positive weight: keep tap 0
    high = torch.maximum(high, low)
    span = int((high - low).max()) + 1 if index.numel() else 1
    span = min(span, n_in)
    return low.clamp(max=n_in - span), span


def _window_reduce(x: torch.Tensor, rows: int, cols: int, op) -> torch.Tensor:
    """(C, h, w) -> (C, h - rows + 1, w - cols + 1): ``op`` (torch.maximum / minimum) over
    every rows x cols window, separably (much faster than max_pool2d with many channels)."""
    h, w = x.shape[-2:]
    out = x[:, : h - rows + 1]
    for shift in range(1, rows):
        out = op(out, x[:, shift : h - rows + 1 + shift])
    full = out
    out = full[:, :, : w - cols + 1]
    for shift in range(1, cols):
        out = op(out, full[:, :, shift : w - cols + 1 + shift])
    return out


def _band_rows(channels: int, width: int) -> int:
    return max(1, _BAND_BYTES // (4 * max(1, channels) * max(1, width)))


def _assembled_scores(products: torch.Tensor) -> torch.Tensor:
    """(N, ...) products p_n[c] * m_n(x) -> (...) their sum over n, added in order n = 0, 1, ...

    The one definition of an assembled score's float value: every path of the label map
    computes a score this way, so they agree bit for bit (and ties are real ties).
    """
    if products.shape[0] == 1:
        return products[0].clone()
    total = products[0] + products[1]
    for n in range(2, products.shape[0]):
        total.add_(products[n])
    return total


def _dense_assembled_argmax(m: torch.Tensor, probs: torch.Tensor):
    """Best score and class per pixel, every class scored at every pixel.

    m: (N, r, w) mask values; probs: (N, K). Returns (r, w) float32 scores and (r, w) long
    classes: the argmax over classes of :func:`_assembled_scores` (first maximum; a NaN
    counts as the maximum, as in ``torch.argmax``). Classes go in chunks of bounded memory.
    """
    n, r, w = m.shape
    k = probs.shape[1]
    step = max(1, _ASSEMBLED_BYTES // (8 * max(1, r * w)))
    best = label = None
    for start in range(0, k, step):
        p = probs[:, start : start + step]  # (N, c)
        total = p[0][:, None, None] * m[0]
        for i in range(1, n):  # the order of _assembled_scores
            total.add_(p[i][:, None, None] * m[i])
        value, index = total.max(0)
        if best is None:
            best, label = value, index
            continue
        better = (value > best) | (value.isnan() & ~best.isnan())
        best = torch.where(better, value, best)
        label = torch.where(better, index + start, label)
    return best, label


def _tile_bounds(m: torch.Tensor, sizes: tuple[int, ...]):
    """Per square tile of each size (coarse to fine, each a multiple of the next), every
    mask's max and min over the tile: a list of (max (N, tiles), min (N, tiles), both as
    rows (tiles, 2 * N) [max..., min...], (rows, cols) tile grid), tiles in row-major order.
    m: (N, R, W), R and W multiples of sizes[0].
    """
    n = m.shape[0]
    out = []
    hi = lo = m
    finer = 1
    for size in reversed(sizes):  # fine to coarse, each level from the one below
        while finer < size:  # halve: elementwise max / min of strided halves (fast)
            hi = torch.maximum(hi[:, :, 0::2], hi[:, :, 1::2])
            hi = torch.maximum(hi[:, 0::2], hi[:, 1::2])
            lo = torch.minimum(lo[:, :, 0::2], lo[:, :, 1::2])
            lo = torch.minimum(lo[:, 0::2], lo[:, 1::2])
            finer *= 2
        grid = (hi.shape[1], hi.shape[2])
        high, low = hi.reshape(n, -1).contiguous(), lo.reshape(n, -1).contiguous()
        out.append((high, low, torch.cat([high, low]).t().contiguous(), grid))
    return out[::-1]


def _can_win(upper: torch.Tensor, best_lower: torch.Tensor, n: int) -> torch.Tensor:
    """upper >= best_lower, less a margin that covers float rounding: bounds and scores are
    sums of n non-negative products, each within a relative n * 2**-24 of its exact value
    (the absolute part covers underflow)."""
    slack = 1e-5 + 4 * (n + 1) * 2.0**-24
    return upper >= best_lower * (1 - slack) - 1e-30


def _assembled_argmax(m: torch.Tensor, probs: torch.Tensor, probs_t: torch.Tensor):
    """The class per pixel of assembled scores, as :func:`_dense_assembled_argmax` (bit for
    bit, for finite inputs), without scoring every class everywhere.

    m: (N, r, w) mask values in [0, 1]; probs: (N, K) class probabilities, probs_t its
    (K, N) transpose. Returns (r, w) long, or None when too many candidates survive
    (near-identical classes: score densely then).

    On a tile where mask n ranges over [lo_n, hi_n], class c scores at most
    sum_n p_n[c] hi_n and at least sum_n p_n[c] lo_n; a class whose upper bound is below
    some class's lower bound cannot win on the tile. Tiles of 32 x 32 pixels bound every
    class (one matrix product); then each surviving (tile, class) pair is checked on the
    tile's four quarters, down to 2 x 2 pixels (by gathering the pair's bounds, or, when
    few classes are open over many tiles, by matrix products over those classes). A tile
    left with one candidate is labelled with it; the candidates of the remaining 2 x 2
    tiles are scored exactly at their pixels and a pixel gets the lowest class reaching its
    best score. The bounds carry a margin for float rounding (:func:`_can_win`), so a class
    is dropped only where its exact score is below another's: the winner always survives.
    Memory: the band's mask maps, their tile bounds and work arrays of ``_ASSEMBLED_BYTES``.
    """
    n, r, w = m.shape
    k = probs.shape[1]
    sizes = _ASSEMBLED_TILES
    top = sizes[0]
    height, width = -(-r // top) * top, -(-w // top) * top
    if (height, width) != (r, w):  # repeated edge pixels change no tile's bounds
        m = F.pad(m[None], (0, width - w, 0, height - r), mode="replicate")[0]
    levels = _tile_bounds(m, sizes)
    label = torch.full((height, width), k, dtype=torch.long)

    def settle(tile, cls, grid, size):
        """Label the tiles with a single candidate; return the pairs of the others."""
        count = torch.bincount(tile, minlength=grid[0] * grid[1])
        single = count.index_select(0, tile) == 1
        done, rest = single.nonzero()[:, 0], (~single).nonzero()[:, 0]
        if len(done):
            done_tile = tile.index_select(0, done)
            tiles = label.view(grid[0], size, grid[1], size)
            tiles[done_tile // grid[1], :, done_tile % grid[1], :] = cls.index_select(0, done)[:, None, None]
        return tile.index_select(0, rest), cls.index_select(0, rest)

    # coarsest tiles: every class, by matrix products, classes in chunks of bounded memory
    high, low, _, grid = levels[0]
    tiles = high.shape[1]
    step = max(1, _ASSEMBLED_BYTES // (4 * tiles))
    best_lower = torch.full((tiles,), float("-inf"))
    for start in range(0, k, step):
        best_lower = torch.maximum(best_lower, (probs_t[start : start + step] @ low).amax(0))
    tile_ids, class_ids = [], []
    pairs = 0
    for start in range(0, k, step):
        upper = probs_t[start : start + step] @ high  # (c, tiles)
        cls, tile = _can_win(upper, best_lower, n).nonzero(as_tuple=True)
        pairs += len(tile)
        if pairs > _ASSEMBLED_MAX_PAIRS:
            return None
        class_ids.append(cls + start)
        tile_ids.append(tile)
    tile, cls = settle(torch.cat(tile_ids), torch.cat(class_ids), grid, top)

    # quarters of the tiles still open, for their candidates
    for (high, low, rows, child_grid), size in zip(levels[1:], sizes[1:], strict=True):
        if not len(tile):  # every tile settled
            break
        q = child_grid[0] // grid[0]
        if len(tile) * q * q > _ASSEMBLED_MAX_PAIRS:
            return None
        offsets = (torch.arange(q)[:, None] * child_grid[1] + torch.arange(q)[None, :]).flatten()
        base = (tile // grid[1]) * q * child_grid[1] + (tile % grid[1]) * q
        child = (base[:, None] + offsets[None, :]).flatten()  # (pairs * q * q,)
        grid = child_grid
        union, local = torch.unique(cls, return_inverse=True)
        if len(union) * high.shape[1] <= min(_ASSEMBLED_DENSER * len(child), _ASSEMBLED_BYTES // 16):
            # few classes over many tiles: bound the classes open anywhere on every tile by
            # matrix products (much cheaper per bound than gathering pairs)
            open_ = torch.zeros(len(union), high.shape[1], dtype=torch.bool)
            open_[local.repeat_interleave(q * q), child] = True  # (U, tiles)
            union_probs = probs_t.index_select(0, union)
            upper = union_probs @ high  # (U, tiles)
            best_lower = (union_probs @ low).amax(0)  # any class's lower bound will do
            keep, tile = (open_ & _can_win(upper, best_lower, n)).nonzero(as_tuple=True)
            tile, cls = settle(tile, union.index_select(0, keep), grid, size)
            continue
        step = max(1, _ASSEMBLED_BYTES // (2 * n * 4 * q * q))
        values = [  # (pairs * q * q, 2): upper, lower bound of each pair's class on each child
            torch.bmm(
                F.embedding(child[i * q * q : (i + step) * q * q], rows).view(-1, 2 * q * q, n),
                F.embedding(cls[i : i + step], probs_t)[:, :, None],  # row gathers (fast)
            ).view(-1, 2)
            for i in range(0, len(tile), step)
        ]
        values = torch.cat(values) if values else torch.zeros(0, 2)
        tile, cls = child, cls.repeat_interleave(q * q)
        best_lower = torch.full((grid[0] * grid[1],), float("-inf"))
        best_lower = best_lower.scatter_reduce(0, tile, values[:, 1], "amax")
        keep = _can_win(values[:, 0], best_lower.index_select(0, tile), n).nonzero()[:, 0]
        tile, cls = settle(tile.index_select(0, keep), cls.index_select(0, keep), grid, size)

    # pixels of the finest tiles still open: exact scores of their candidates
    size = sizes[-1]
    area = size * size
    if len(tile):
        if len(tile) * area > _ASSEMBLED_MAX_PAIRS:
            return None
        corner = (tile // grid[1]) * size * width + (tile % grid[1]) * size
        offsets = (torch.arange(size)[:, None] * width + torch.arange(size)[None, :]).flatten()
        where = (corner[:, None] + offsets[None, :]).flatten()  # (pairs * area,) pixels
        flat = m.reshape(n, -1)
        step = max(1, _ASSEMBLED_BYTES // (4 * n * area))
        scores = torch.cat([
            _assembled_scores(
                flat.index_select(1, where[i * area : (i + step) * area]).view(n, -1, area)
                * probs.index_select(1, cls[i : i + step])[:, :, None]
            ).flatten()
            for i in range(0, len(tile), step)
        ])
        best = torch.full((height * width,), float("-inf")).scatter_reduce(0, where, scores, "amax")
        winner = (scores == best.index_select(0, where)).nonzero()[:, 0]
        picked = torch.full((height * width,), k).scatter_reduce(
            0, where.index_select(0, winner), cls.repeat_interleave(area).index_select(0, winner), "amin"
        )
        label = torch.minimum(label, picked.view(height, width))
    label = label[:r, :w]
    if bool((label == k).any()):  # a pixel without a candidate: cannot happen, but be sure
        return None
    return label


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
        """(H0, W0) argmax over classes of the full-size scores, -1 / ``unknown_label`` below
        the threshold.

        Exactly the argmax of :meth:`probs` (ties: the lowest class index), but only the
        classes that can win somewhere are upsampled: a full-size score is a convex blend of
        a few low-resolution cells, so it lies between their min and max, and a class whose
        max over those cells is below another class's min cannot win there. Bands of output
        rows are upsampled for their candidate classes only, so 3000 classes cost about as
        much as the handful that compete in each region.

        Assembled scores (DeOP, GKC) go to :meth:`_assembled_label_map`: exactly the argmax
        of the assembled scores at full size (made from the resized mask maps; they agree
        with :meth:`probs` up to float rounding of a different summation order).
        """
        h0, w0 = self.size
        if not isinstance(self._scores, torch.Tensor):
            return self._assembled_label_map()
        labels = np.empty((h0, w0), dtype=np.int32)
        band_top, band_ids = 0, []
        for top, bottom, class_ids in self._candidate_bands():
            if class_ids is None:
                labels[top:bottom] = self._label_rows(top, bottom, None)
                band_top = bottom
                continue
            band_ids.append(class_ids)
            # merge thin pieces into bands of a few dozen rows: fewer, larger tensor ops
            if bottom - band_top >= _MERGE_ROWS or bottom == h0:
                merged = torch.unique(torch.cat(band_ids))
                labels[band_top:bottom] = self._label_rows(band_top, bottom, merged)
                band_top, band_ids = bottom, []
        return labels

    def _assembled_label_map(self) -> np.ndarray:
        """The label map of assembled scores (DeOP, GKC) without K full-size maps.

        Assembly is linear: the full-size score of class c at pixel x is
        S_c(x) = sum_n p_n[c] m_n(x), where m_n is mask n's sigmoid map carried to the
        output pixel by the same bilinear resizing as the scores. Only the N mask maps are
        resized, and S_c(x) is computed as float32 products summed over n in order
        (:func:`_assembled_scores`), so the label map is exactly the argmax over classes of
        those (K, H, W) scores (ties: the lowest class index), made without them: see
        :func:`_assembled_argmax`.
        """
        k = len(self.classes)
        h0, w0 = self.size
        probs = self._scores.probs[0].float()  # (N, K)
        n = probs.shape[0]
        masks = self._scores.mask_maps()
        total_weight = probs.sum(1)  # (N,): sum over classes, for the unknown test
        finite = bool(torch.isfinite(probs).all() and torch.isfinite(self._scores.mask_logits).all())
        probs_t = probs.t().contiguous()  # (K, N)
        tile = _ASSEMBLED_TILES[0]
        width = -(-w0 // tile) * tile
        rows_per_band = max(1, _ASSEMBLED_BAND_BYTES // (4 * n * width) // tile) * tile
        labels = np.empty((h0, w0), dtype=np.int32)
        for top in range(0, h0, rows_per_band):
            bottom = min(top + rows_per_band, h0)
            m = self._upsampler.rows(masks, top, bottom)  # (N, r, W0)
            label = None
            if finite and k > _ASSEMBLED_DENSE_CLASSES:
                label = _assembled_argmax(m, probs, probs_t)
            if label is None:
                best_score, label = _dense_assembled_argmax(m, probs)
            elif self.unknown_threshold is not None:  # the winners' scores, as the dense path's
                chosen = probs.index_select(1, label.flatten()).view(n, *label.shape)
                best_score = _assembled_scores(m * chosen)
            label = label.to(torch.int32)
            if self.unknown_threshold is not None:
                total = torch.einsum("nrw,n->rw", m, total_weight)
                best_prob = (best_score + _EPS) / (total + k * _EPS)
                label[best_prob < self.unknown_threshold] = self.unknown_label
            labels[top:bottom] = label.numpy()
        return labels

    def _label_rows(self, top: int, bottom: int, class_ids: torch.Tensor | None) -> np.ndarray:
        """Label rows [top, bottom) considering only ``class_ids`` (sorted; None: all).

        Returns (bottom - top, W0) int32. Memory: one band of at most ``_CLASS_CHUNK``
        full-width maps at a time.
        """
        k = len(self.classes)
        scores = None if class_ids is None else self._scores[class_ids]  # tensor scores only
        num = k if class_ids is None else len(class_ids)
        w0 = self.size[1]
        out = np.empty((bottom - top, w0), dtype=np.int32)
        step = _band_rows(min(num, _CLASS_CHUNK), w0)
        for band_top in range(top, bottom, step):
            band_bottom = min(band_top + step, bottom)
            best_score = best_index = None
            for start in range(0, num, _CLASS_CHUNK):
                if class_ids is None:
                    chunk = self._classes(start, start + _CLASS_CHUNK)
                else:
                    chunk = scores[start : start + _CLASS_CHUNK]
                up = self._upsampler.rows(chunk, band_top, band_bottom)
                value, index = up.max(0)
                if best_score is None:
                    best_score, best_index = value, index
                else:
                    better = value > best_score
                    best_score = torch.where(better, value, best_score)
                    best_index = torch.where(better, index + start, best_index)
            if class_ids is not None:
                best_index = class_ids[best_index]
            band = best_index.to(torch.int32)
            if self.unknown_threshold is not None:
                total = self._upsampler.rows(self._total, band_top, band_bottom)[0]
                best_prob = (best_score + _EPS) / (total + k * _EPS)
                band[best_prob < self.unknown_threshold] = self.unknown_label
            out[band_top - top : band_bottom - top] = band.numpy()
        return out

    def _candidate_bands(self):
        """Yield (top, bottom, class_ids) bands covering the output rows, where class_ids
        (sorted, or None for all) holds every class that can be the argmax in those rows.

        Each output pixel p blends input cells i with weights w_i(p) >= 0 summing to 1, so
        a class's full-size score lies between its min and max over the cells involved, and
        the best score at p is at least T(p) = max(the largest such min, max_i w_i(p) * best
        score at cell i). A first cut keeps the classes whose max reaches T, over fixed
        windows of cells. Then, on a run of rows (and of columns) along which the taps are
        fixed, the weights are affine, so each score is bilinear over a block and its range
        is that of the block's 4 corners: exact values at the corners prune the rest. Bounds
        carry a margin for float rounding, so no class that can win is ever dropped.
        """
        k = len(self.classes)
        h0 = self.size[0]
        scores = self._scores
        # scores are >= 0, so a non-finite sum means a NaN / inf somewhere (or an overflow):
        # leave those to the plain argmax, which is the reference behaviour
        if k <= _PRUNE_MIN_CLASSES or not bool(torch.isfinite(scores.sum())):
            yield 0, h0, None
            return
        up = self._upsampler
        h, w = scores.shape[-2:]
        span_r = min(h, int((up.rows_index.max(1).values - up.rows_index.min(1).values).max()) + 1)
        pos_c, span_c = _window_positions(up.cols_index, up.cols_weight, w)
        used_c = torch.unique(pos_c)
        col_runs = _runs(up.cols_key)
        floors = self._row_floors(scores.max(0).values, pos_c, w - span_c + 1)  # (H0, w')
        pieces = _runs(up.rows_key)
        piece_pos = [min(int(up.rows_index[top].min()), h - span_r) for top, _ in pieces]
        first = 0
        while first < len(pieces):
            # the pieces whose taps lie in the same window of span_r cell rows
            last = first
            while last < len(pieces) and piece_pos[last] == piece_pos[first]:
                last += 1
            group, pos = pieces[first:last], piece_pos[first]
            first = last
            cells = scores[:, pos : pos + span_r]
            high = _window_reduce(cells, span_r, span_c, torch.maximum)[:, 0][:, used_c]
            best_min = _window_reduce(cells, span_r, span_c, torch.minimum)[:, 0].max(0).values
            floor = floors[group[0][0] : group[-1][1]].min(0).values
            threshold = torch.maximum(best_min, floor)[used_c] * (1.0 - _PRUNE_MARGIN)
            class_ids = (high.max(1).values >= threshold.min()).nonzero()[:, 0]
            passes = high[class_ids] >= threshold  # (U, used windows)
            class_ids, passes = class_ids[passes.any(1)], passes[passes.any(1)]
            if len(class_ids) <= 1:
                for top, bottom in group:
                    yield top, bottom, class_ids
                continue
            keep = self._corner_check(class_ids, passes, group, used_c, pos_c, col_runs)
            for piece, (top, bottom) in enumerate(group):
                yield top, bottom, class_ids[keep[:, piece]]

    def _corner_check(self, class_ids, passes, group, used_c, pos_c, col_runs) -> torch.Tensor:
        """(U, P) bool: can class ``class_ids[u]`` win somewhere in row piece p of ``group``?

        On a block (row piece x column run) every score is bilinear, so its range is that of
        the 4 corner values, computed exactly (bit-identical to the label map's) for the
        (class, column run) pairs that passed the window test (``passes``: (U, used windows)).
        Classes go in chunks (two passes when there are many), so memory stays bounded.
        """
        u_count, p_count = len(class_ids), len(group)
        runs = len(col_runs)
        starts = torch.tensor([start for start, _ in col_runs])
        ends = torch.tensor([stop - 1 for _, stop in col_runs])
        # the column windows each run touches: [first, last] (a run's taps are fixed)
        window_slot = torch.full((int(pos_c.max()) + 1,), -1, dtype=torch.long)
        window_slot[used_c] = torch.arange(len(used_c))
        run_of_column = torch.repeat_interleave(torch.arange(runs), ends - starts + 1)
        first = torch.full((runs,), len(used_c)).scatter_reduce(
            0, run_of_column, window_slot[pos_c], "amin", include_self=True
        )
        last = torch.full((runs,), -1).scatter_reduce(
            0, run_of_column, window_slot[pos_c], "amax", include_self=True
        )
        rows = torch.tensor([r for top, bottom in group for r in (top, bottom - 1)])
        chunk = max(1, _PRUNE_BYTES // (8 * runs * 2 * 2 * p_count * 4))
        chunks = [slice(i, i + chunk) for i in range(0, u_count, chunk)]

        def corners(part: slice):
            run_passes = torch.zeros(len(class_ids[part]), runs, dtype=torch.bool)
            for offset in range(int((last - first).max()) + 1):
                run_passes |= passes[part][:, torch.minimum(first + offset, last)]
            pair_u, pair_run = run_passes.nonzero(as_tuple=True)
            values = self._corner_values(class_ids[part], pair_u, starts[pair_run], ends[pair_run], rows)
            values = values.view(len(pair_u), 2, p_count, 2)  # (pairs, column, piece, row)
            return pair_u, pair_run, values.amax(dim=(1, 3)), values.amin(dim=(1, 3))

        # scores are >= 0, so -1 is below every lower bound
        best_lower = torch.full((runs, p_count), -1.0)  # (runs, P)
        kept = []
        for part in chunks:
            pair_u, pair_run, upper, lower = corners(part)
            best_lower = best_lower.scatter_reduce(
                0, pair_run[:, None].expand(-1, p_count), lower, "amax", include_self=True
            )
            kept.append((pair_u, pair_run, upper) if len(chunks) == 1 else None)
        keep = torch.zeros(u_count, p_count)
        for part, stored in zip(chunks, kept, strict=True):
            pair_u, pair_run, upper = stored if stored is not None else corners(part)[:3]
            winning = upper >= best_lower[pair_run] * (1.0 - _PRUNE_MARGIN)  # (pairs, P)
            keep[part].index_add_(0, pair_u, winning.float())
        return keep > 0

    def _corner_values(self, class_ids, pair_u, left, right, rows) -> torch.Tensor:
        """Full-size scores of class ``class_ids[pair_u]`` at output rows ``rows`` (R,) and
        columns ``left`` / ``right`` (pairs,) -> (pairs, 2, R), bit-identical to
        :meth:`_RowUpsampler.rows` (the same float operations in the same order)."""
        up = self._upsampler
        index, weight = up.rows_index[rows], up.rows_weight[rows]
        needed, local = torch.unique(index, return_inverse=True)
        local = local.view(index.shape)
        cells = self._scores[class_ids[:, None], needed[None, :]]  # (U, cell rows, w)
        band = cells.index_select(1, local[:, 0]) * weight[:, 0, None]
        for t in range(1, 4):
            band = band + cells.index_select(1, local[:, t]) * weight[:, t, None]
        band = band.permute(0, 2, 1)  # (U, w, R)
        columns = torch.stack([left, right], 1)  # (pairs, 2)
        taps, tap_weight = up.cols_index[columns], up.cols_weight[columns]  # (pairs, 2, 4)
        u_index = pair_u[:, None]
        values = band[u_index, taps[..., 0]] * tap_weight[..., 0, None]  # (pairs, 2, R)
        for t in range(1, 4):
            values = values + band[u_index, taps[..., t]] * tap_weight[..., t, None]
        return values

    def _row_floors(self, best_cell: torch.Tensor, pos_c: torch.Tensor, windows: int) -> torch.Tensor:
        """(H0, windows): per output row and column window, a lower bound of the best
        full-size score there: min over its pixels of max_i w_i(p) * best_cell[i]."""
        up = self._upsampler
        h0, w0 = self.size
        out = torch.empty(h0, windows)
        step = max(1, 2**22 // max(1, w0))
        for top in range(0, h0, step):
            index, weight = up.rows_index[top : top + step], up.rows_weight[top : top + step]
            rows = best_cell.index_select(0, index[:, 0]) * weight[:, 0, None]
            for t in range(1, 4):
                rows = torch.maximum(rows, best_cell.index_select(0, index[:, t]) * weight[:, t, None])
            pixels = rows.index_select(1, up.cols_index[:, 0]) * up.cols_weight[:, 0]
            for t in range(1, 4):
                pixels = torch.maximum(pixels, rows.index_select(1, up.cols_index[:, t]) * up.cols_weight[:, t])
            floor = torch.zeros(pixels.shape[0], windows)
            out[top : top + step] = floor.scatter_reduce(
                1, pos_c.expand(pixels.shape[0], -1), pixels, "amin", include_self=False
            )
        return out

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

    @cached_property
    def colours(self) -> np.ndarray:
        """(K, 3) uint8 colour per class (see :func:`class_colours`: from the class name)."""
        return class_colours(self.classes)

    @property
    def background_index(self) -> int | None:
        """The background class: the one named ``background=`` when segmenting, else an
        entry literally named "background" (any of its synonyms); None without one."""
        if self.unknown_label >= 0:
            return self.unknown_label
        for index, entry in enumerate(self.classes):
            if "background" in (_name_key(n) for n in entry.split(",")):
                return index
        return None

    def colour_map(self) -> np.ndarray:
        """(H, W, 3) uint8 colour picture of the label map (unknown = black)."""
        k = len(self.classes)
        colours = np.concatenate([self.colours, np.zeros((1, 3), np.uint8)])
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
            table[:k] = self.colours
            img.putpalette(table.reshape(-1).tolist())
            return img
        if k > 65535:
            raise ValueError("label maps support at most 65535 classes")
        arr = np.where(self.label_map < 0, 65535, self.label_map).astype(np.uint16)
        return Image.fromarray(arr)

    def overlay(
        self,
        image,
        alpha: float = 0.5,
        image_format: str = "RGB",
        *,
        legend: bool = True,
        background_alpha: float = 0.0,
    ):
        """The image with class colours blended in -> PIL RGB.

        Unknown pixels are left untouched, and so is the background class
        (:attr:`background_index`) unless ``background_alpha`` > 0 (then it is blended that
        faintly). With ``legend``, a panel on the right lists the classes present (largest
        first) with their colours, so the picture is wider than the image (and taller when
        the list is longer than the image is high); ``legend=False`` keeps the image's size.
        """
        from PIL import Image

        from .images import to_tensor

        for name, value in (("alpha", alpha), ("background_alpha", background_alpha)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        (rgb,) = to_tensor(image, image_format)[:1]
        base = (rgb.permute(1, 2, 0).numpy() * 255.0).round().astype(np.float32)
        if base.shape[:2] != self.label_map.shape:
            raise ValueError(
                f"image is {base.shape[1]}x{base.shape[0]} but the label map is "
                f"{self.label_map.shape[1]}x{self.label_map.shape[0]}: pass the segmented image"
            )
        colours = self.colour_map().astype(np.float32)
        strength = np.where(self.label_map >= 0, alpha, 0.0).astype(np.float32)
        background = self.background_index
        if background is not None:
            strength[self.label_map == background] = alpha * background_alpha
        strength = strength[..., None]
        blended = np.where(strength > 0, (1 - strength) * base + strength * colours, base)
        picture = Image.fromarray(blended.round().clip(0, 255).astype(np.uint8), "RGB")
        return self._with_legend(picture) if legend else picture

    def legend_entries(self) -> list[tuple[str, tuple[int, int, int] | None, float]]:
        """(class name, colour or None if unpainted, fraction of pixels) for the classes
        present, largest first; the background is listed with colour None."""
        ids, counts = np.unique(self.label_map, return_counts=True)
        total = self.label_map.size
        background = self.background_index
        entries = []
        for i, c in sorted(zip(ids.tolist(), counts.tolist(), strict=True), key=lambda x: -x[1]):
            if i < 0:
                continue
            colour = None if i == background else tuple(int(v) for v in self.colours[i])
            entries.append((self.classes[i], colour, c / total))
        return entries

    def _with_legend(self, picture):
        """Append a legend panel (white, one row per present class) right of ``picture``."""
        from PIL import Image, ImageDraw, ImageFont

        entries = self.legend_entries()
        if not entries:
            return picture
        try:
            font = ImageFont.load_default(size=12)
        except TypeError:  # Pillow < 10.1: fixed bitmap font
            font = ImageFont.load_default()
        measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
        labels = [f"{name}  {fraction:.0%}" for name, _, fraction in entries]
        text_w = max(measure.textbbox((0, 0), t, font=font)[2] for t in labels)
        row, swatch, pad = 16, 12, 4
        width = pad + swatch + pad + text_w + pad
        height = max(picture.height, pad + row * len(entries) + pad)
        canvas = Image.new("RGB", (picture.width + width, height), (255, 255, 255))
        canvas.paste(picture, (0, 0))
        draw = ImageDraw.Draw(canvas)
        x = picture.width + pad
        for n, ((_, colour, _), label) in enumerate(zip(entries, labels, strict=True)):
            y = pad + n * row
            box = (x, y + 2, x + swatch - 1, y + 2 + swatch - 1)
            if colour is None:  # unpainted background: an empty box
                draw.rectangle(box, outline=(128, 128, 128))
            else:
                draw.rectangle(box, fill=colour)
            draw.text((x + swatch + pad, y + 1), label, fill=(0, 0, 0), font=font)
        return canvas

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
