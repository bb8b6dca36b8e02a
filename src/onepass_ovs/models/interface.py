"""The interface every model family implements (typed, so the Segmenter needs no probes).

A model maps padded images and text embeddings to class scores, in two parts so that one
image pass can serve any number of vocabularies::

    encoding = model.encode_image(images, image_sizes)     # vocabulary-independent
    scores = model.decode_scores(encoding, text_embeddings)  # cheap per vocabulary
    scores == model.predict_scores(images, text_embeddings, image_sizes)

Shapes: images (B, 3, H, W) in [0, 1], zero-padded to the config's pad multiple;
image_sizes the valid (h, w) of each image (None: all fill the canvas); text embeddings
from ``model.text(vocabulary)``, L2-normalised, K first: (K, E) for DeOP and the clip
family, (K, P, E) per prompt template for SED, (K, S, E) per name for GKC; scores
(B, K, h', w') non-negative class scores on the padded canvas at any stride dividing the
pad multiple, or lazy :class:`~onepass_ovs.models.assembly.AssembledScores` (DeOP, GKC).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch

from ..config import ModelConfig


@runtime_checkable
class SegmentationModel(Protocol):
    """What every registered family's model provides."""

    config: ModelConfig

    def text(self, vocabulary: Sequence[str]) -> torch.Tensor:
        """Normalised class embeddings, K first (see above); each name is encoded once and
        cached."""
        ...

    def encode_image(self, images: torch.Tensor, image_sizes=None) -> dict[str, torch.Tensor]:
        """The vocabulary-independent image pass: a dict of tensors (family-specific)."""
        ...

    def decode_scores(
        self, encoding: dict[str, torch.Tensor], text_embeddings: torch.Tensor
    ) -> torch.Tensor:
        """Class scores (B, K, h', w') from an encoding and the text embeddings."""
        ...

    def predict_scores(
        self, images: torch.Tensor, text_embeddings: torch.Tensor, image_sizes=None
    ) -> torch.Tensor:
        """``decode_scores(encode_image(images, image_sizes), text_embeddings)``."""
        ...


@runtime_checkable
class MaskClassifier(Protocol):
    """Families that classify external region masks (``segment(..., masks=...)``)."""

    @property
    def needs_masks(self) -> bool:
        """True when even the dense features need the masks (mask-reading severance)."""
        ...

    def dense_features(self, images: torch.Tensor, image_sizes=None, masks=None) -> torch.Tensor:
        """Dense normalised features (B, E, h, w); ``masks`` (B, M, h', w') in [0, 1]."""
        ...

    def mask_scores(
        self, dense: torch.Tensor, masks: torch.Tensor, text_embeddings: torch.Tensor
    ) -> torch.Tensor:
        """dense (E, h, w), masks (M, h', w') -> painted class scores (K, h', w')."""
        ...
