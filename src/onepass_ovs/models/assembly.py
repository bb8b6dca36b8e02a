"""Assemble (mask logits, class logits) into per-class semantic scores, as DeOP's authors do.

    sem[c](y, x) = sum_n softmax(class_logits_n)[c] * sigmoid(up(M_n))(y, x)

with ``up`` the bilinear resize (align_corners=False) of the mask LOGITS to the padded
input size, the sigmoid after it (the order of the authors' code and of our training loss;
sigmoid-then-resize is not the same), and the void probability dropped without
renormalising.

At full input resolution these maps are K x H x W, too large to hold for big images or
vocabularies, so :class:`AssembledScores` keeps the masks and class probabilities and
computes any set of rows on demand (bilinear resizing is separable: a row of ``up(M)``
mixes two rows of M), chunked so that at most a bounded number of full-width mask rows
exist at once. The resized mask values are made by elementwise two-tap blends, so a value
does not depend on which other rows are computed with it (label maps rely on that to be
exactly the argmax of the assembled scores, see ``SegmentationResult``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# bytes of sigmoid(up(M)) rows materialised at once
_MASK_ROWS_BYTES = 64 * 2**20


def resize_taps(n_in: int, n_out: int, device=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The two taps of 1-D bilinear resizing n_in -> n_out (align_corners=False, the
    sampling of ``F.interpolate``): output i = x[i0] * (1 - w) + x[i1] * w.

    Returns i0, i1 (n_out,) long and w (n_out,) float32.
    """
    src = ((torch.arange(n_out, dtype=torch.float64) + 0.5) * (n_in / n_out) - 0.5).clamp_min(0)
    i0 = src.floor().long().clamp_max(n_in - 1)
    i1 = (i0 + 1).clamp_max(n_in - 1)
    return i0.to(device), i1.to(device), (src - i0).float().to(device)


def semantic_scores(mask_logits: torch.Tensor, class_logits: torch.Tensor, size=None) -> torch.Tensor:
    """Dense assembled scores (B, K, H, W) at ``size`` (default: the mask resolution).

    The direct formula, for tests and small inputs: materialises B x N x H x W masks.
    """
    probs = class_logits.float().softmax(-1)[..., :-1]
    masks = mask_logits.float()
    if size is not None and tuple(size) != tuple(masks.shape[-2:]):
        masks = F.interpolate(masks, size=tuple(size), mode="bilinear", align_corners=False)
    return torch.einsum("bnk,bnhw->bkhw", probs, masks.sigmoid())


class AssembledScores:
    """Assembled class scores of a batch, (B, K, H, W) on the padded canvas, held as mask
    logits (B, N, h, w) and class probabilities (B, N, K) and evaluated lazily.

    ``image(i)`` -> the scores of one image (batch of one); ``rows(index)`` -> (B, K, n, W)
    dense rows (``index`` a LongTensor of canvas rows); ``dense()`` -> (B, K, H, W).
    ``select(start, stop)``, ``class_sum()`` and ``merge_classes`` act on the class
    probabilities, which is exact because assembly is linear in them.
    """

    def __init__(self, mask_logits: torch.Tensor, class_logits: torch.Tensor | None, canvas,
                 *, probs: torch.Tensor | None = None):
        self.mask_logits = mask_logits
        if probs is None:
            probs = class_logits.float().softmax(-1)[..., :-1]
        self.probs = probs  # (B, N, K)
        self.canvas = (int(canvas[0]), int(canvas[1]))
        self._col_taps = None
        self._identity = False  # probs is the identity: rows are the mask maps themselves
        self._cache: tuple[torch.Tensor, torch.Tensor] | None = None

    # -- tensor-like surface ------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (self.probs.shape[0], self.probs.shape[2], *self.canvas)

    def __len__(self) -> int:
        return self.probs.shape[0]

    def _with(self, mask_logits: torch.Tensor, probs: torch.Tensor) -> AssembledScores:
        return AssembledScores(mask_logits, None, self.canvas, probs=probs)

    def image(self, index: int) -> AssembledScores:
        return self._with(self.mask_logits[index : index + 1], self.probs[index : index + 1])

    def __getitem__(self, index: int) -> AssembledScores:
        return self.image(index)

    def __iter__(self):
        return (self.image(i) for i in range(len(self)))

    def to(self, device) -> AssembledScores:
        return self._with(self.mask_logits.to(device), self.probs.to(device))

    def cpu(self) -> AssembledScores:
        return self.to("cpu")

    def float(self) -> AssembledScores:
        return self._with(self.mask_logits.float(), self.probs.float())

    def select(self, start: int, stop: int) -> AssembledScores:
        """Classes [start, stop)."""
        return self._with(self.mask_logits, self.probs[..., start:stop])

    def mask_maps(self) -> AssembledScores:
        """The sigmoid mask maps sigmoid(up(M_n)) of the first image as a lazy score map of
        N "classes" (identity class probabilities): ``rows(index)`` -> (1, N, n, W), the
        mask values themselves (no product with the identity)."""
        n = self.mask_logits.shape[1]
        identity = torch.eye(n, device=self.probs.device)[None]
        out = self._with(self.mask_logits[:1], identity)
        out._identity = True
        return out

    def class_sum(self) -> AssembledScores:
        """The sum over classes, as a one-class score map."""
        return self._with(self.mask_logits, self.probs.sum(-1, keepdim=True))

    def merge_classes(self, index: int, count: int) -> AssembledScores:
        """The last ``count`` classes summed into one, inserted at ``index``."""
        k = self.probs.shape[-1]
        others, merged = self.probs[..., : k - count], self.probs[..., k - count :].sum(-1, keepdim=True)
        probs = torch.cat([others[..., :index], merged, others[..., index:]], -1)
        return self._with(self.mask_logits, probs)

    # -- evaluation ---------------------------------------------------------------------
    def _mask_rows(self, index: torch.Tensor) -> torch.Tensor:
        """sigmoid(up(M)) at canvas rows ``index``: (B, N, n, W).

        Elementwise two-tap blends (rows, then columns), so every value is computed by the
        same float operations whatever the other rows asked for.
        """
        if self._cache is not None and torch.equal(self._cache[0], index):
            return self._cache[1]
        m = self.mask_logits.float()
        h, w = m.shape[-2:]
        height, width = self.canvas
        if self._col_taps is None:
            self._col_taps = resize_taps(w, width, m.device)
        r0, r1, rw = (t[index.to(m.device)] for t in resize_taps(h, height, m.device))
        rows = m.index_select(2, r0) * (1 - rw)[:, None] + m.index_select(2, r1) * rw[:, None]
        c0, c1, cw = self._col_taps
        out = (rows.index_select(3, c0) * (1 - cw) + rows.index_select(3, c1) * cw).sigmoid_()
        self._cache = (index.clone(), out)
        return out

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        """Dense scores at canvas rows ``index`` (LongTensor): (B, K, n, W)."""
        index = torch.as_tensor(index, dtype=torch.long)
        b, n = self.mask_logits.shape[:2]
        per_row = max(1, b * n * self.canvas[1] * 4)
        step = max(1, _MASK_ROWS_BYTES // per_row)
        parts = []
        for start in range(0, index.numel(), step):
            masks = self._mask_rows(index[start : start + step])
            if self._identity:
                parts.append(masks)
                continue
            parts.append(torch.einsum("bnk,bnyx->bkyx", self.probs.float(), masks))
        return torch.cat(parts, 2)

    def dense(self) -> torch.Tensor:
        """(B, K, H, W) dense scores: one matrix product over the proposals."""
        masks = self._mask_rows(torch.arange(self.canvas[0]))  # (B, N, H, W)
        b, n = masks.shape[:2]
        out = torch.bmm(self.probs.float().transpose(1, 2), masks.flatten(2))  # (B, K, H*W)
        return out.view(b, -1, *self.canvas)
