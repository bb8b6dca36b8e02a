"""Segmenter: load/save a model, preprocess images, segment them against any vocabulary.

Every family's model exposes the same small interface:

- ``model.config``: a :class:`~onepass_ovs.config.ModelConfig`;
- ``model.text(vocabulary) -> (K, E)`` normalised class embeddings (cached per entry);
- ``model.predict_scores(images, text_embeddings, image_sizes) -> (B, K, h, w)``
  non-negative class scores on the padded canvas (any stride).

so the Segmenter stays family-agnostic.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from .config import ModelConfig, preset_config
from .hub import CONFIG_NAME, WEIGHTS_NAME, load_weights, resolve_model_dir, save_weights
from .images import Geometry, prepare, to_tensor
from .result import SegmentationResult
from .text import parse_vocabulary


def build_model(config: ModelConfig) -> nn.Module:
    """A randomly initialised model of the config's family."""
    if config.family == "deop":
        from .models.deop import DeOP

        return DeOP(config)
    raise ValueError(f"no model for family {config.family!r}")


def _device(device) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _dtype(dtype) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, str):
        names = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
                 "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
        if dtype not in names:
            raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(names)}")
        return names[dtype]
    return dtype


def _is_batch(images) -> bool:
    if isinstance(images, (list, tuple)):
        return True
    return isinstance(images, torch.Tensor) and images.ndim == 4


class Segmenter:
    """Open-vocabulary semantic segmentation of images against any list of class names.

    >>> seg = Segmenter.from_pretrained("demo")
    >>> result = seg.segment("scene.png", ["red circle", "blue square", "background"])
    >>> result.label_map  # (H, W) int32 indices into the vocabulary
    """

    def __init__(self, model: nn.Module, *, device=None, dtype=None):
        self.device = _device(device)
        self.dtype = _dtype(dtype)
        self.model = model.to(device=self.device, dtype=self.dtype).eval()

    # -- construction -----------------------------------------------------------------
    @property
    def config(self) -> ModelConfig:
        return self.model.config

    @classmethod
    def from_config(cls, name_or_config, *, device=None, dtype=None, seed: int | None = None):
        """A randomly initialised model from a preset name, a dict or a ModelConfig."""
        if isinstance(name_or_config, str):
            config = preset_config(name_or_config)
        elif isinstance(name_or_config, dict):
            config = ModelConfig.from_dict(name_or_config)
        elif isinstance(name_or_config, ModelConfig):
            config = ModelConfig.from_dict(name_or_config.to_dict())
        else:
            raise TypeError(f"expected a preset name, dict or ModelConfig, got {type(name_or_config)}")
        if seed is not None:
            torch.manual_seed(seed)
        return cls(build_model(config), device=device, dtype=dtype)

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike,
        *,
        device=None,
        dtype=None,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool = False,
    ):
        """Load a pretrained model: a preset (``"demo"``), ``"hf-hub:org/repo[@rev]"``,
        a local folder (``config.json`` + ``model.safetensors``), or ``"clip:..."``."""
        if str(name_or_path).startswith("clip:"):
            from_clip = getattr(cls, "from_clip", None)
            if from_clip is None:
                raise ValueError("training-free 'clip:' models are not available in this version")
            return from_clip(
                str(name_or_path), device=device, dtype=dtype, revision=revision,
                cache_dir=cache_dir, local_files_only=local_files_only,
            )
        folder = resolve_model_dir(
            name_or_path, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only
        )
        config = ModelConfig.load(folder / CONFIG_NAME)
        model = build_model(config)
        load_weights(model, folder / WEIGHTS_NAME)
        return cls(model, device=device, dtype=dtype)

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write ``config.json`` + ``model.safetensors`` (nothing else) into ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.config.save(directory / CONFIG_NAME)
        save_weights(self.model, directory / WEIGHTS_NAME)
        return directory

    def to(self, device=None, dtype=None) -> Segmenter:
        if device is not None:
            self.device = _device(device)
        if dtype is not None:
            self.dtype = _dtype(dtype)
        self.model.to(device=self.device, dtype=self.dtype)
        return self

    # -- inference ----------------------------------------------------------------------
    @torch.inference_mode()
    def encode_text(self, vocabulary: Sequence[str]) -> torch.Tensor:
        """(K, E) normalised class embeddings; each entry is encoded once and cached."""
        return self.model.text(vocabulary)

    @torch.inference_mode()
    def segment(
        self,
        images,
        vocabulary: Sequence[str],
        *,
        unknown_threshold: float | None = None,
        size=None,
        batch_size: int = 4,
        image_format: str = "RGB",
        progress: bool | None = None,
    ):
        """Segment one image (-> SegmentationResult) or a list / (B, 3, H, W) batch (-> list).

        Args:
            images: a path, PIL image, numpy (H, W, 3) array, (3, H, W) tensor, or a list of
                them / a (B, 3, H, W) tensor. See :mod:`onepass_ovs.images`.
            vocabulary: class names; ``"a, b"`` gives one class two synonyms.
            unknown_threshold: pixels whose best class probability is below it get -1.
            size: override the resize policy: an int short side or an exact (h, w).
            batch_size: images per forward pass (images of equal working size are batched).
            image_format: "RGB" or "BGR" for numpy/tensor inputs.
            progress: show a progress bar (default: for more than 8 images).
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if unknown_threshold is not None and not 0.0 <= unknown_threshold <= 1.0:
            raise ValueError(f"unknown_threshold must be in [0, 1], got {unknown_threshold}")
        classes = list(vocabulary) if not isinstance(vocabulary, str) else vocabulary
        parse_vocabulary(classes)  # validate before any image work
        many = _is_batch(images)
        inputs = list(images) if isinstance(images, (list, tuple)) else [images]
        if many and not inputs:
            return []
        text = self.encode_text(classes).to(self.device)

        results: list[SegmentationResult] = []
        bar = _progress(len(inputs), progress)
        try:
            for start in range(0, len(inputs), batch_size):
                chunk: list[torch.Tensor] = []
                for item in inputs[start : start + batch_size]:
                    chunk.extend(to_tensor(item, image_format))
                for scores, geometry in self._predict(chunk, text, size, batch_size):
                    results.append(SegmentationResult(scores, classes, geometry, unknown_threshold))
                if bar is not None:
                    bar.update(min(batch_size, len(inputs) - start))
        finally:
            if bar is not None:
                bar.close()
        return results if many else results[0]

    def _predict(self, images: list[torch.Tensor], text: torch.Tensor, size, batch_size: int):
        """Yield (scores (K, h, w), Geometry) per image, in order."""
        prepared = [prepare(img, self.config.preprocess, size) for img in images]
        out: list = [None] * len(prepared)
        groups: dict[tuple[int, int], list[int]] = {}
        for index, (_, geometry) in enumerate(prepared):
            groups.setdefault(geometry.padded, []).append(index)
        for indices in groups.values():
            for start in range(0, len(indices), batch_size):
                batch_ids = indices[start : start + batch_size]
                batch = torch.stack([prepared[i][0] for i in batch_ids])
                sizes = [prepared[i][1].resized for i in batch_ids]
                scores = self.predict_scores(batch, text, sizes)
                for i, s in zip(batch_ids, scores, strict=True):
                    out[i] = (s, prepared[i][1])
        yield from out

    def predict_scores(self, batch: torch.Tensor, text: torch.Tensor, sizes) -> torch.Tensor:
        """(B, 3, Hp, Wp) padded [0, 1] images -> (B, K, h, w) class scores (CPU float)."""
        batch = batch.to(device=self.device, dtype=self.dtype)
        scores = self.model.predict_scores(batch, text, sizes)
        return scores.float().cpu()

    def __repr__(self) -> str:
        cfg = self.config
        return f"Segmenter(family={cfg.family!r}, name={cfg.name!r}, device={self.device})"


def _progress(total: int, progress: bool | None):
    if progress is None:
        progress = total > 8
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="segment", unit="img")


__all__ = ["Segmenter", "build_model", "Geometry"]
