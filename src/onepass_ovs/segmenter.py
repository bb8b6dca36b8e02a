"""Segmenter: load/save a model, preprocess images, segment them against any vocabulary.

Every family's model implements :class:`~onepass_ovs.models.interface.SegmentationModel`
(config, ``text(vocabulary)``, ``predict_scores(images, text, image_sizes)``), so the
Segmenter stays family-agnostic; families that classify external masks also implement
:class:`~onepass_ovs.models.interface.MaskClassifier`. Sliding windows live in
:mod:`onepass_ovs.sliding`, mask painting in :mod:`onepass_ovs.painting`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from .config import ModelConfig
from .hub import CONFIG_NAME, WEIGHTS_NAME, load_weights, resolve_model_dir, save_weights
from .images import Geometry, prepare, to_tensor
from .models.interface import MaskClassifier
from .models.registry import build_model, config_from_dict, load_config, preset_config
from .painting import as_masks, paint_mask_scores
from .result import UNKNOWN, SegmentationResult
from .sliding import Windows, slide, window_layout
from .text import parse_vocabulary


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
            config = config_from_dict(name_or_config)
        elif isinstance(name_or_config, ModelConfig):
            config = config_from_dict(name_or_config.to_dict())
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
        config = load_config(folder / CONFIG_NAME)
        model = build_model(config)
        load_weights(model, folder / WEIGHTS_NAME)
        return cls(model, device=device, dtype=dtype)

    @classmethod
    def from_clip(
        cls,
        model_name: str,
        pretrained: str | None = None,
        *,
        device=None,
        dtype=None,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool = False,
        severance: str = "clearclip",
        templates: str | Sequence[str] = "imagenet80",
        logit_scale: float | None = None,
    ):
        """A training-free segmenter from any open_clip ViT: one CLIP pass, dense classification.

        ``model_name`` (the ``clip:`` prefix is optional):

        - ``"ViT-B-16/openai"`` or ``"ViT-B-16"`` with ``pretrained="openai"``: an open_clip
          architecture and pretrained tag (the tag also fixes details such as QuickGELU);
        - ``"hf-hub:org/repo[@rev]"``: an open_clip Hub repo (``open_clip_config.json`` +
          ``open_clip_model.safetensors``);
        - ``"local-dir:/path"`` or a folder with ``open_clip_config.json``;
        - ``"demo"`` or a saved onepass folder: the CLIP inside that model.

        ``severance``: the last block's variant, ``"clearclip"`` (default), ``"identity"``,
        ``"mask-guided"`` (needs ``segment(..., masks=...)``) or ``"none"``.
        ``templates``: ``"imagenet80"`` (default), ``"single"`` or a list of ``"... {} ..."``.
        ``logit_scale``: softmax scale over classes (1 / temperature); default: CLIP's own.

        Weights are safetensors only, fetched and cached by huggingface_hub (``revision``,
        ``cache_dir``, ``HF_HUB_OFFLINE`` and ``local_files_only`` honoured); offline and not
        cached raises :class:`~onepass_ovs.hub.ModelNotAvailableError`.
        """
        from .hub import resolve_clip
        from .models.training_free import load_training_free

        source = resolve_clip(
            model_name, pretrained, revision=revision, cache_dir=cache_dir,
            local_files_only=local_files_only,
        )
        templates = templates if isinstance(templates, str) else list(templates)
        model = load_training_free(
            source, severance=severance, templates=templates, logit_scale=logit_scale
        )
        return cls(model, device=device, dtype=dtype)

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write ``config.json`` + ``model.safetensors`` (nothing else) into ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.config.save(directory / CONFIG_NAME)
        save_weights(self.model, directory / WEIGHTS_NAME)
        return directory

    def export_onnx(self, directory: str | os.PathLike, **kwargs) -> Path:
        """Write an ONNX folder (image graph + text weights + config) for
        :meth:`from_onnx`; see :mod:`onepass_ovs.integrations.onnx`. Needs ``[onnx]``."""
        from .integrations.onnx import export_onnx

        return export_onnx(self, directory, **kwargs)

    @classmethod
    def from_onnx(cls, directory: str | os.PathLike, *, providers=None, session_options=None):
        """A Segmenter whose image side runs on onnxruntime (folder from :meth:`export_onnx`)."""
        from .integrations.onnx import from_onnx

        return from_onnx(cls, directory, providers=providers, session_options=session_options)

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
        background: str | None = None,
        masks=None,
        size=None,
        sliding_window=None,
        batch_size: int = 4,
        image_format: str = "RGB",
        progress: bool | None = None,
    ):
        """Segment one image (-> SegmentationResult) or a list / (B, 3, H, W) batch (-> list).

        Resize policy: each image is resized so its short side is ``config.preprocess.
        short_side`` (long side capped at ``max_long_side``), then zero-padded to a multiple
        of ``pad_multiple``. If that working image is larger than ``config.preprocess.
        window`` on a side, it is segmented in overlapping windows whose class scores are
        blended (linear cross-fade over the overlaps), so memory is bounded by the window,
        not the image. The label map always comes back at the input's full size.

        Args:
            images: a path, PIL image, numpy (H, W, 3) array, (3, H, W) tensor, or a list of
                them / a (B, 3, H, W) tensor. See :mod:`onepass_ovs.images`.
            vocabulary: class names; ``"a, b"`` gives one class two synonyms.
            unknown_threshold: pixels whose best class probability is below it get -1 (or
                the ``background`` class).
            background: the vocabulary entry that stands for "none of the others". Its
                synonyms are scored one by one and their probabilities summed ("background,
                sky, wall" = any of them) instead of averaging their embeddings, and pixels
                below ``unknown_threshold`` get it instead of -1.
            masks: external region masks (``clip`` family): per image an (M, H, W) bool or
                [0, 1] float array/tensor at the image's size (a list of them for a list of
                images). Each mask is classified by its average CLIP feature and painted;
                overlaps average the masks' class distributions, uncovered pixels keep the
                dense per-pixel classification.
            size: override the resize policy: an int short side, an exact (h, w), or
                ``"original"`` (work at the image's own size; windows bound the memory).
            sliding_window: None (the config's windows), False (always one pass), an int
                window side (stride 3/4 of it) or a (window, stride) pair, in working pixels.
            batch_size: images per forward pass; windows of one image are batched too,
                up to about a megapixel per pass.
            image_format: "RGB" or "BGR" for numpy/tensor inputs.
            progress: show a progress bar (default: for more than 8 images).
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if unknown_threshold is not None and not 0.0 <= unknown_threshold <= 1.0:
            raise ValueError(f"unknown_threshold must be in [0, 1], got {unknown_threshold}")
        classes = list(vocabulary) if not isinstance(vocabulary, str) else vocabulary
        synonyms = parse_vocabulary(classes)  # validate before any image work
        background_index = _background_index(classes, synonyms, background)
        windows = window_layout(sliding_window, self.config.preprocess)
        many = _is_batch(images)
        inputs = list(images) if isinstance(images, (list, tuple)) else [images]
        if many and not inputs:
            return []
        mask_list = self._mask_list(masks, many, inputs)

        entries, num_background = classes, 0
        if background_index is not None:
            # the background's synonyms become separate rows, summed after scoring
            entries = [c for i, c in enumerate(classes) if i != background_index]
            entries += list(synonyms[background_index])
            num_background = len(synonyms[background_index])
        text = self.encode_text(entries).to(self.device)
        unknown_label = UNKNOWN if background_index is None else background_index

        results: list[SegmentationResult] = []
        done = 0
        bar = _progress(len(inputs), progress)
        try:
            for start in range(0, len(inputs), batch_size):
                chunk: list[torch.Tensor] = []
                for item in inputs[start : start + batch_size]:
                    chunk.extend(to_tensor(item, image_format))
                chunk_masks = None
                if mask_list is not None:
                    chunk_masks = mask_list[done : done + len(chunk)]
                done += len(chunk)
                for scores, geometry in self._predict(
                    chunk, text, size, batch_size, windows, chunk_masks
                ):
                    if background_index is not None:
                        scores = _merge_background(scores, background_index, num_background)
                    results.append(
                        SegmentationResult(
                            scores, classes, geometry, unknown_threshold, unknown_label
                        )
                    )
                if bar is not None:
                    bar.update(min(batch_size, len(inputs) - start))
        finally:
            if bar is not None:
                bar.close()
        return results if many else results[0]

    def _mask_list(self, masks, many: bool, inputs: list) -> list | None:
        if masks is None:
            return None
        if not isinstance(self.model, MaskClassifier):
            raise ValueError(
                f"masks= needs a model that classifies masks (the 'clip' family); this is "
                f"{self.config.family!r}"
            )
        if not many:
            return [masks]
        count = sum(
            item.shape[0] if isinstance(item, torch.Tensor) and item.ndim == 4 else 1
            for item in inputs
        )
        mask_list = list(masks) if not isinstance(masks, torch.Tensor) else list(masks.unbind(0))
        if len(mask_list) != count:
            raise ValueError(f"got masks for {len(mask_list)} images but {count} images")
        return mask_list

    def _predict(
        self,
        images: list[torch.Tensor],
        text: torch.Tensor,
        size,
        batch_size: int,
        windows: Windows | None = None,
        masks: list | None = None,
    ):
        """Yield (scores (K, h, w), Geometry) per image, in order."""
        prepared = [prepare(img, self.config.preprocess, size) for img in images]
        out: list = [None] * len(prepared)
        groups: dict[tuple[int, int], list[int]] = {}
        for index, (canvas, geometry) in enumerate(prepared):
            if masks is not None:
                image_masks = as_masks(masks[index], geometry.original, index)
                scores = paint_mask_scores(
                    self.model, canvas, geometry, image_masks, text, windows, batch_size,
                    self.device, self.dtype,
                )
                out[index] = (scores, geometry)
            elif windows is not None and windows.needed(geometry.padded):
                scores = slide(
                    lambda batch, sizes, boxes: self.predict_scores(batch, text, sizes),
                    canvas, geometry, windows, batch_size, self.config.preprocess.pad_multiple,
                )
                out[index] = (scores, geometry)
            else:
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

    @torch.inference_mode()
    def predict_scores(self, batch: torch.Tensor, text: torch.Tensor, sizes):
        """(B, 3, Hp, Wp) padded [0, 1] images -> (B, K, h, w) class scores on the CPU:
        a float tensor, or lazy assembled scores (DeOP) with the same indexing by image."""
        batch = batch.to(device=self.device, dtype=self.dtype)
        scores = self.model.predict_scores(batch, text, sizes)
        return scores.float().cpu()

    def __repr__(self) -> str:
        cfg = self.config
        return f"Segmenter(family={cfg.family!r}, name={cfg.name!r}, device={self.device})"


def _background_index(classes: list[str], synonyms, background: str | None) -> int | None:
    """Index of the vocabulary entry named by ``background`` (an entry or one of its names)."""
    if background is None:
        return None
    if not isinstance(background, str):
        raise TypeError(f"background must be a class name, got {type(background).__name__}")
    key = " ".join(background.split()).lower()
    for index, (entry, names) in enumerate(zip(classes, synonyms, strict=True)):
        if key == " ".join(entry.split()).lower() or key in (n.lower() for n in names):
            return index
    raise ValueError(
        f"background {background!r} is not in the vocabulary {classes}: add it as a class, "
        "e.g. 'background' or 'background, sky, wall, floor'"
    )


def _merge_background(scores, index: int, count: int):
    """(K - 1 + count, h, w) scores, background synonyms last -> (K, h, w), their sum at
    ``index``: the probability of "any of the background names"."""
    if not isinstance(scores, torch.Tensor):  # lazy assembled scores merge their classes
        return scores.merge_classes(index, count)
    others, names = scores[: scores.shape[0] - count], scores[scores.shape[0] - count :]
    return torch.cat([others[:index], names.sum(0, keepdim=True), others[index:]])


def _progress(total: int, progress: bool | None):
    if progress is None:
        progress = total > 8
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="segment", unit="img")


__all__ = ["Segmenter", "build_model", "Geometry"]
