"""Assemble (mask logits, class logits) into per-class semantic score maps."""

from __future__ import annotations

import torch


def semantic_scores(mask_logits: torch.Tensor, class_logits: torch.Tensor) -> torch.Tensor:
    """sem[c] = sum_n softmax(class_logits_n)[c] * sigmoid(M_n), void dropped.

    mask_logits (B, N, h, w), class_logits (B, N, K+1) with the void class last ->
    (B, K, h, w) at the mask resolution. Bilinear resizing is linear, so resizing these
    maps afterwards equals resizing every mask first, at a fraction of the memory.
    The void probability is dropped without renormalising (as DeOP).
    """
    probs = class_logits.float().softmax(-1)[..., :-1]
    return torch.einsum("bnk,bnhw->bkhw", probs, mask_logits.float().sigmoid())
