"""Segmenter: load/save a model, preprocess images, segment them against any vocabulary.

Every family's model implements :class:`~onepass_ovs.models.interface.SegmentationModel`
(config, ``text(vocabulary)``, ``predict_scores(images, text, image_sizes)``), so the
Segmenter stays family-agnostic; families that classify external masks also implement
:class:`~onepass_ovs.models.interface.MaskClassifier`. Sliding windows live in
:mod:`onepass_ovs.sliding`, mask painting in :mod:`onepass_ovs.painting`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .encoding import (
    EncodedImage,
    EncodedPass,
    ImageEncoding,
    keep_for_decoding,
    map_tensors,
    presence_scores,
)
from .hub import CONFIG_NAME, WEIGHTS_NAME, load_weights, resolve_model_dir, save_weights
from .images import Geometry, prepare, to_tensors
from .models.interface import MaskClassifier
from .models.registry import build_model, config_from_dict, load_config, preset_config
from .painting import as_masks, paint_mask_scores
from .result import UNKNOWN, SegmentationResult
from .sliding import (
    Windows,
    blend_windows,
    slide,
    window_chunks,
    window_layout,
    window_valid_sizes,
)
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

    def __init__(self, model: nn.Module, *, device=None, dtype=None, fast: bool = False):
        self.device = _device(device)
        self.dtype = _dtype(dtype)
        self.model = model.to(device=self.device, dtype=self.dtype).eval()
        self.fast_path: FastPath | None = None
        self._compiled_encode = None  # torch.compile'd encode_image (optimize(compile=...))
        if fast:
            self.optimize()

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

    def save_pretrained(
        self,
        directory: str | os.PathLike,
        *,
        model_card: bool = False,
        metrics: dict | None = None,
        repo_id: str | None = None,
        license: str | None = None,
    ) -> Path:
        """Write ``config.json`` + ``model.safetensors`` into ``directory``; with
        ``model_card=True`` also a generated ``README.md`` (see
        :func:`onepass_ovs.model_card.model_card`: ``metrics``, ``repo_id``, ``license``)."""
        if not model_card and (metrics is not None or repo_id is not None or license is not None):
            raise ValueError("metrics, repo_id and license go into the model card: pass model_card=True")
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.config.save(directory / CONFIG_NAME)
        save_weights(self.model, directory / WEIGHTS_NAME)
        if model_card:
            from .model_card import write_model_card

            write_model_card(
                directory, self.config, metrics=metrics, repo_id=repo_id, license=license
            )
        return directory

    def push_to_hub(
        self,
        repo_id: str,
        *,
        private: bool = False,
        token: str | None = None,
        commit_message: str = "Upload onepass_ovs model",
        revision: str | None = None,
        metrics: dict | None = None,
        license: str | None = None,
    ):
        """Publish this model on the Hugging Face Hub as ``repo_id`` (``"org/name"``).

        Uploads what :meth:`save_pretrained` writes (``config.json`` + ``model.safetensors``)
        plus a generated ``README.md`` model card (family, loading snippet, vocabulary
        protocol, preprocessing, and ``metrics`` if given, e.g. ``{"ADE20K-150": {"mIoU":
        29.1}}``), in one commit. The repo is created if missing (``private`` applies
        then); ``revision`` names a branch, created from main if missing. ``token``: a Hub
        token (default: the logged-in one). Load it back with
        ``Segmenter.from_pretrained("hf-hub:<repo_id>")``. Returns huggingface_hub's
        ``CommitInfo``.
        """
        import tempfile

        from .hub import upload_model_folder

        repo_id = repo_id[len("hf-hub:") :] if repo_id.startswith("hf-hub:") else repo_id
        with tempfile.TemporaryDirectory(prefix="onepass_push_") as folder:
            self.save_pretrained(
                folder, model_card=True, metrics=metrics, repo_id=repo_id, license=license
            )
            return upload_model_folder(
                folder, repo_id, private=private, token=token,
                commit_message=commit_message, revision=revision,
            )

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
                them / a (B, 3, H, W) tensor. See :mod:`onepass_ovs.images`. Or an
                :class:`~onepass_ovs.encoding.ImageEncoding` from :meth:`encode`: then only
                the text and the cheap decoding run (``size``, ``sliding_window``,
                ``batch_size`` and ``image_format`` were fixed by ``encode``; ``masks`` is
                not supported), with results equal to segmenting the images.
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
        if isinstance(images, ImageEncoding):
            self._check_encoding(images, masks, size, sliding_window)
            vocab = self._vocabulary_text(vocabulary, background)
            results = [
                SegmentationResult(
                    scores, vocab.classes, geometry, unknown_threshold, vocab.unknown_label
                )
                for scores, geometry in self._decode(images, vocab)
            ]
            return results if images.many else results[0]
        # validate before any image work
        classes, synonyms, background_index = _parse_vocabulary(vocabulary, background)
        windows = window_layout(sliding_window, self.config.preprocess)
        many = _is_batch(images)
        inputs = list(images) if isinstance(images, (list, tuple)) else [images]
        if many and not inputs:
            return []
        mask_list = self._mask_list(masks, many, inputs)

        vocab = self._encode_vocabulary(classes, synonyms, background_index)
        text, num_background, unknown_label = vocab.text, vocab.num_background, vocab.unknown_label

        results: list[SegmentationResult] = []
        done = 0
        bar = _progress(len(inputs), progress)
        try:
            for start in range(0, len(inputs), batch_size):
                chunk = to_tensors(inputs[start : start + batch_size], image_format, start if many else None)
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
        for batch_ids, batch, sizes in _grouped_batches(prepared, groups, batch_size):
            scores = self.predict_scores(batch, text, sizes)
            for i, s in zip(batch_ids, scores, strict=True):
                out[i] = (s, prepared[i][1])
        yield from out

    @torch.inference_mode()
    def predict_scores(self, batch: torch.Tensor, text: torch.Tensor, sizes):
        """(B, 3, Hp, Wp) padded [0, 1] images -> (B, K, h, w) class scores on the CPU:
        a float tensor, or lazy assembled scores (DeOP) with the same indexing by image."""
        return self._scores_on_device(batch, text, sizes).float().cpu()

    def _scores_on_device(self, batch: torch.Tensor, text: torch.Tensor, sizes):
        batch = self._model_input(batch)
        with self._autocast():
            if self.fast_path is None:
                return self.model.predict_scores(batch, text, sizes)
            return self.model.decode_scores(self._encode(batch, sizes), text)

    def _encode(self, batch: torch.Tensor, sizes) -> dict:
        return (self._compiled_encode or self.model.encode_image)(batch, sizes)

    def _model_input(self, batch: torch.Tensor) -> torch.Tensor:
        batch = batch.to(device=self.device, dtype=self.dtype)
        if self.fast_path is not None and self.fast_path.channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        return batch

    def _autocast(self):
        if self.fast_path is None or self.fast_path.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.fast_path.autocast)

    # -- the fast path ----------------------------------------------------------------------
    def optimize(
        self,
        *,
        autocast: str | torch.dtype | None = "auto",
        channels_last: bool = True,
        compile: bool | str = False,
    ) -> Segmenter:
        """Switch inference to the fast path; returns ``self``. ``Segmenter(model,
        fast=True)`` does the same with the defaults.

        - ``autocast``: ``"auto"`` (bfloat16 on a CUDA GPU that supports it, off elsewhere),
          ``"bf16"``, ``"fp16"`` or None. The model's forward runs under ``torch.autocast``
          (the families keep their numerically delicate steps in float32: softmaxes,
          classification logits, assembly); class scores come back in float32.
        - ``channels_last``: convolution weights and inputs in channels-last memory
          format (faster convolutions on GPUs and oneDNN CPUs; identical arithmetic).
        - ``compile``: ``torch.compile`` the image pass (``True``: the default inductor
          backend, or a backend name); the first call per input size compiles.

        Attention already runs through ``F.scaled_dot_product_attention``
        (``nn.MultiheadAttention`` with ``need_weights=False``, the severance blocks, CAL's
        fused pooling); SED's linear attention has no softmax to fuse. On a CPU the default
        fast path (channels-last only) gives the normal path's results up to float
        rounding. Undo with ``optimize(autocast=None, channels_last=False)``.
        """
        if autocast == "auto":
            use_bf16 = (
                self.device.type == "cuda" and self.dtype == torch.float32
                and torch.cuda.is_bf16_supported()
            )
            amp = torch.bfloat16 if use_bf16 else None
        elif autocast is None or autocast is False:
            amp = None
        else:
            amps = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
                    "float16": torch.float16, torch.bfloat16: torch.bfloat16,
                    torch.float16: torch.float16}
            amp = amps.get(autocast)
            if amp is None:
                raise ValueError(f"autocast must be 'auto', 'bf16', 'fp16' or None, got {autocast!r}")
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.model.to(memory_format=memory_format)
        backend = None
        self._compiled_encode = None
        if compile:
            backend = "inductor" if compile is True else str(compile)
            self._compiled_encode = torch.compile(self.model.encode_image, backend=backend)
        self.fast_path = FastPath(amp, channels_last, backend)
        if amp is None and not channels_last and backend is None:
            self.fast_path = None
        return self

    @torch.inference_mode()
    def predict_labels(self, batch: torch.Tensor, vocabulary, sizes=None) -> torch.Tensor:
        """The batched throughput path: (B, 3, Hp, Wp) images already at the working size
        (padded [0, 1], e.g. from :func:`onepass_ovs.images.prepare`) -> (B, Hp, Wp) int64
        label maps on the device, no CPU round trip.

        ``vocabulary``: class names or (K, E) text embeddings from :meth:`encode_text`.
        Scores are bilinearly resized to the canvas and the best class taken per pixel, as
        :meth:`segment` does for an image already at the working size (no unknown
        threshold, no background merging).
        """
        text = vocabulary if isinstance(vocabulary, torch.Tensor) else self.encode_text(vocabulary)
        scores = self._scores_on_device(batch, text.to(self.device), sizes)
        if not isinstance(scores, torch.Tensor):  # assembled at the canvas already
            return scores.dense().argmax(1)
        scores = scores.float()
        if scores.shape[-2:] != batch.shape[-2:]:
            scores = F.interpolate(scores, size=batch.shape[-2:], mode="bilinear", align_corners=False)
        return scores.argmax(1)

    # -- encode once, decode any vocabulary -----------------------------------------------
    @torch.inference_mode()
    def encode(
        self,
        images,
        *,
        size=None,
        sliding_window=None,
        batch_size: int = 4,
        image_format: str = "RGB",
    ) -> ImageEncoding:
        """The vocabulary-independent image pass of one image or a list / batch of them.

        Returns an :class:`~onepass_ovs.encoding.ImageEncoding` (on this segmenter's device)
        to pass to :meth:`segment` or :meth:`classify` with any vocabulary: each further
        vocabulary costs only its text embeddings and the decoding, and gives the results
        ``segment(images, vocabulary)`` gives. ``size``, ``sliding_window``, ``batch_size``
        and ``image_format`` mean what they mean in :meth:`segment` and are fixed here.
        Memory: the encodings of all the images are held (``emb.nbytes``).
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        windows = window_layout(sliding_window, self.config.preprocess)
        many = _is_batch(images)
        inputs = list(images) if isinstance(images, (list, tuple)) else [images]
        encoded: list[EncodedImage] = []
        for start in range(0, len(inputs), batch_size):
            chunk = to_tensors(inputs[start : start + batch_size], image_format, start if many else None)
            encoded.extend(self._encode_chunk(chunk, size, batch_size, windows))
        return ImageEncoding(
            encoded, many, self.config.family, self.config.name, id(self.model), self.device
        )

    def _encode_chunk(self, images, size, batch_size, windows) -> list[EncodedImage]:
        """:meth:`_predict`'s passes, keeping the encodings instead of decoding them."""
        prepared = [prepare(img, self.config.preprocess, size) for img in images]
        out: list = [None] * len(prepared)
        groups: dict[tuple[int, int], list[int]] = {}
        for index, (canvas, geometry) in enumerate(prepared):
            if windows is not None and windows.needed(geometry.padded):
                passes = []
                for boxes in window_chunks(geometry, windows, batch_size):
                    batch = torch.stack([canvas[:, y0:y1, x0:x1] for y0, x0, y1, x1 in boxes])
                    encoding = self.encode_batch(batch, window_valid_sizes(geometry, boxes))
                    passes.append(EncodedPass(encoding, boxes))
                out[index] = EncodedImage(geometry, passes, windows=windows)
            else:
                groups.setdefault(geometry.padded, []).append(index)
        for batch_ids, batch, sizes in _grouped_batches(prepared, groups, batch_size):
            shared = EncodedPass(self.encode_batch(batch, sizes))
            for row, i in enumerate(batch_ids):
                out[i] = EncodedImage(prepared[i][1], [shared], row=row)
        return out

    @torch.inference_mode()
    def encode_batch(self, batch: torch.Tensor, sizes) -> dict:
        """(B, 3, Hp, Wp) padded [0, 1] images -> the model's encoding (on the device)."""
        batch = self._model_input(batch)
        with self._autocast():
            return keep_for_decoding(self._encode(batch, sizes))

    @torch.inference_mode()
    def decode_batch(self, encoding: dict, text: torch.Tensor):
        """An encoding + (K, E) text -> (B, K, h, w) scores on the CPU (tensor or lazy).
        Encodings held elsewhere (``emb.to("cpu")`` to spare GPU memory) are moved here."""
        encoding = map_tensors(encoding, lambda t: t.to(self.device))
        with self._autocast():
            return self.model.decode_scores(encoding, text).float().cpu()

    def _check_encoding(self, encoding: ImageEncoding, masks, size, sliding_window) -> None:
        if encoding.model_id != id(self.model):
            raise ValueError(
                f"this ImageEncoding was made by another model ({encoding.family}/"
                f"{encoding.model_name}); encode the images with this segmenter"
            )
        fixed = {"masks": masks, "size": size, "sliding_window": sliding_window}
        given = [name for name, value in fixed.items() if value is not None]
        if given:
            raise ValueError(
                f"{', '.join(given)} cannot be given with an ImageEncoding: size and "
                "sliding_window are fixed by encode(); masks need segment(images, ...)"
            )

    def _vocabulary_text(self, vocabulary, background) -> _Vocabulary:
        return self._encode_vocabulary(*_parse_vocabulary(vocabulary, background))

    def _encode_vocabulary(self, classes, synonyms, background_index: int | None) -> _Vocabulary:
        """Text embeddings (K', D) of a parsed vocabulary: one row per class, except the
        background, whose synonyms become separate rows (last), summed after scoring."""
        entries, num_background = classes, 0
        if background_index is not None:
            entries = [c for i, c in enumerate(classes) if i != background_index]
            entries += list(synonyms[background_index])
            num_background = len(synonyms[background_index])
        text = self.encode_text(entries).to(self.device)
        unknown_label = UNKNOWN if background_index is None else background_index
        return _Vocabulary(list(classes), text, background_index, num_background, unknown_label)

    def _decode(self, encoding: ImageEncoding, vocab: _Vocabulary):
        """Yield (scores (K, h, w), Geometry) per encoded image, in order."""
        multiple = self.config.preprocess.pad_multiple
        decoded: dict[int, object] = {}  # shared whole-image passes, decoded once
        for image in encoding.images:
            if image.windows is None:
                shared = image.passes[0]
                if id(shared) not in decoded:
                    decoded[id(shared)] = self.decode_batch(shared.encoding, vocab.text)
                scores = decoded[id(shared)][image.row]
            else:
                outputs = (
                    (p.boxes, self.decode_batch(p.encoding, vocab.text)) for p in image.passes
                )
                scores = blend_windows(outputs, image.geometry, image.windows, multiple)
            if vocab.background_index is not None:
                scores = _merge_background(scores, vocab.background_index, vocab.num_background)
            yield scores, image.geometry

    @torch.inference_mode()
    def classify(
        self,
        images,
        vocabulary: Sequence[str],
        *,
        background: str | None = None,
        **encode_kwargs,
    ):
        """Which classes are in the image: {class name: presence score}, highest first.

        ``images``: an :class:`~onepass_ovs.encoding.ImageEncoding` from :meth:`encode`
        (cheap: text + decoding only) or anything :meth:`encode` takes (encoded first, with
        ``encode_kwargs``). Returns one dict per image (a list for a list of images).

        The presence score of a class is the highest probability it reaches at any pixel of
        the image (probabilities normalised over the vocabulary, taken at the model's output
        resolution over the unpadded region): in [0, 1] (the top class at least 1/K), it says "some region looks most
        like this class, this confidently", not how much of the image it covers (for that,
        ``segment(...).fractions()``). ``background`` merges that entry's synonyms as in
        :meth:`segment`.
        """
        if isinstance(images, ImageEncoding):
            if encode_kwargs:
                raise ValueError(
                    f"{sorted(encode_kwargs)} cannot be given with an ImageEncoding"
                )
            encoding = images
            self._check_encoding(encoding, None, None, None)
        else:
            encoding = self.encode(images, **encode_kwargs)
        vocab = self._vocabulary_text(vocabulary, background)
        out = []
        for scores, geometry in self._decode(encoding, vocab):
            presence = presence_scores(scores, geometry).tolist()
            ranked = sorted(zip(vocab.classes, presence, strict=True), key=lambda kv: -kv[1])
            out.append(dict(ranked))
        return out if encoding.many else out[0]

    def __repr__(self) -> str:
        cfg = self.config
        return f"Segmenter(family={cfg.family!r}, name={cfg.name!r}, device={self.device})"


@dataclass(frozen=True)
class FastPath:
    """What :meth:`Segmenter.optimize` switched on."""

    autocast: torch.dtype | None
    channels_last: bool
    compile_backend: str | None


@dataclass
class _Vocabulary:
    """A parsed vocabulary and its text embeddings (background synonyms last)."""

    classes: list[str]
    text: torch.Tensor
    background_index: int | None
    num_background: int
    unknown_label: int


def _grouped_batches(prepared, groups: dict, batch_size: int):
    """Yield ``(ids, batch (B, 3, H, W), resized sizes)`` over ``groups`` (padded size ->
    indices into ``prepared``, a list of ``(canvas, Geometry)``), ``batch_size`` at a time."""
    for indices in groups.values():
        for start in range(0, len(indices), batch_size):
            batch_ids = indices[start : start + batch_size]
            batch = torch.stack([prepared[i][0] for i in batch_ids])
            yield batch_ids, batch, [prepared[i][1].resized for i in batch_ids]


def _parse_vocabulary(vocabulary, background: str | None):
    """``(classes, synonyms, background_index)`` of a vocabulary; raises on a bad one."""
    classes = list(vocabulary) if not isinstance(vocabulary, str) else vocabulary
    synonyms = parse_vocabulary(classes)
    return classes, synonyms, _background_index(classes, synonyms, background)


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


__all__ = ["Segmenter", "build_model", "Geometry", "ImageEncoding"]
