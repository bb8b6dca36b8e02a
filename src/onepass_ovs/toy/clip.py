"""A tiny CLIP for the shapes world, and its contrastive pretraining.

The architecture is data: an open_clip model config (:func:`tiny_clip_config`) whose
ViT has a convolutional stem in place of the patchify conv (``"conv_stem"``: three 3x3
stride-2 conv + BatchNorm + ReLU, 3 -> 32 -> 64 -> 128, then a 1x1 conv to the width;
a tiny ViT learns shape far faster with it). :func:`onepass_ovs.models.towers.create_clip`
builds it, the loss is ``open_clip.ClipLoss`` and the folder is open_clip's Hub layout
(``open_clip_config.json`` + ``open_clip_model.safetensors``) whose ``model_cfg`` carries
the stem, so every family loads it without code outside the library::

    clip = load_tiny_clip("runs/tiny_clip")                 # an open_clip CLIP
    seg = Segmenter.from_clip("runs/tiny_clip")             # the training-free family
    ModelConfig(..., clip=ClipConfig(model_cfg=config["model_cfg"]))  # DeOP etc.

(plain ``open_clip.create_model("local-dir:...")`` cannot build the stem and refuses it).

:func:`tiny_convnext_clip_config` is the other tower, SED's backbone: a small timm ConvNeXt
through open_clip's ``TimmModel`` at strides 2/4/8/16, pretrained the same way (its crops
are fed as they are: no position table) and saved in the same layout.

Pretraining runs on the library's engine (:class:`~onepass_ovs.training.trainer.Trainer`:
atomic checkpoints, exact resume, a JSONL log); its output folder::

    open_clip_config.json, open_clip_model.safetensors   the CLIP (written at the end)
    config.json, train_log.jsonl, checkpoints/           the engine's run folder

The CLIP only ever sees image-level captions (``scenes.make_caption``); unseen classes
are unseen only for segmentation training later, so they do appear here.

Seed streams (``numpy.random.default_rng`` entropy lists; distinct first entries, so
evaluation never sees a training scene):

- pretraining scenes: ``[TRAIN_STREAM, seed, step, ...]`` (:func:`_training_batch`);
- tiny-CLIP evaluation: ``[EVAL_STREAM, seed, 0]`` (single-object scenes) and
  ``[EVAL_STREAM, seed, 1]`` (region scenes) (:func:`evaluate_tiny_clip`);
- the DeOP recipe's segmentation scenes (``toy.build``) use ``render_scenes``' streams
  ``[seed, i]`` with their own seeds (``TRAIN_SEED``, ``EVAL_SEED``).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from . import scenes

__all__ = [
    "DEFAULT_PROMPT",
    "EVAL_STREAM",
    "PretrainResult",
    "TINY_CLIP_CONFIG",
    "TINY_CLIP_CONV_STEM",
    "TINY_CLIP_NAME",
    "TINY_CLIP_PREPROCESS",
    "TINY_CONVNEXT_CLIP_CONFIG",
    "TRAIN_STREAM",
    "build_tiny_clip",
    "dense_tower",
    "encode_class_prompts",
    "evaluate_tiny_clip",
    "images_to_tensor",
    "is_convnext_clip",
    "load_tiny_clip",
    "patch_features",
    "pretrain_tiny_clip",
    "register_tiny_clip",
    "save_open_clip_folder",
    "tiny_clip_config",
    "tiny_convnext_clip_config",
]

logger = logging.getLogger(__name__)

TINY_CLIP_NAME = "ovs-shapes-clip"

#: First entry of every pretraining scene's seed list (see the module docstring).
TRAIN_STREAM = 0x5EED_0001
#: First entry of every tiny-CLIP evaluation scene's seed list.
EVAL_STREAM = 0x5EED_E7A1

#: open_clip model config of the *patchify* tiny ViT (what open_clip itself can build and
#: what is registered under :data:`TINY_CLIP_NAME`, e.g. for its tokenizer). Patch 8 gives
#: a 16 x 16 token grid on 128 px scenes; the text tower is narrow because its 49408-row
#: token table (open_clip's standard BPE) dominates the parameter count.
TINY_CLIP_CONFIG: dict[str, Any] = {
    "embed_dim": 128,
    "vision_cfg": {
        "image_size": 128,
        "patch_size": 8,
        "layers": 6,
        "width": 128,
        "head_width": 32,
        "mlp_ratio": 4.0,
        "pool_type": "avg",
        "pos_embed_type": "learnable",
        "attentional_pool": False,
    },
    "text_cfg": {
        "context_length": 32,
        "vocab_size": 49408,
        "width": 64,
        "heads": 2,
        "layers": 3,
    },
}

#: Channel widths of the convolutional stem's 3x3 stride-2 convs (patch 8 = 2 ** 3).
TINY_CLIP_CONV_STEM: tuple[int, ...] = (32, 64, 128)


def tiny_clip_config(conv_stem: tuple[int, ...] | None = TINY_CLIP_CONV_STEM) -> dict[str, Any]:
    """The tiny CLIP's model config: :data:`TINY_CLIP_CONFIG` plus ``"conv_stem"``
    (``None`` or ``()``: the patchify ViT), as stored in its folder."""
    cfg = copy.deepcopy(TINY_CLIP_CONFIG)
    if conv_stem:
        cfg["conv_stem"] = [int(c) for c in conv_stem]
    return cfg


#: open_clip model config of the tiny *ConvNeXt* CLIP (SED's backbone in the shapes world):
#: a timm ConvNeXt through open_clip's ``TimmModel`` (global average pool, the trunk
#: head's LayerNorm, a linear projection), the text tower of :data:`TINY_CLIP_CONFIG`.
#: Two keys are this library's extensions, applied by
#: :func:`onepass_ovs.models.towers.create_clip` (open_clip's own factory cannot build it):
#: ``timm_model_kwargs`` (forwarded to ``timm.create_model``: stage widths and depths, a
#: patch-2 stem, channels-last MLPs) and ``timm_first_stage_downsample: false`` (timm
#: downsamples again at the first stage after a stride-2 stem; without it the four stages
#: run at strides 2/4/8/16, so a 128 px scene gives an 8 x 8 cost map). About 1.1 M
#: image-tower parameters.
TINY_CONVNEXT_CLIP_CONFIG: dict[str, Any] = {
    "embed_dim": 128,
    "vision_cfg": {
        "timm_model_name": "convnext_atto",
        "timm_model_pretrained": False,
        "timm_pool": "avg",
        "timm_proj": "linear",
        "image_size": 128,
        "timm_model_kwargs": {
            "dims": [32, 64, 128, 256],
            "depths": [1, 1, 2, 1],
            "patch_size": 2,
            "conv_mlp": False,
            # timm's default layer-scale start (1e-6) leaves these few blocks almost off
            # for a whole CPU-sized run (their scales reached only 0.02-0.05 in 2000 steps)
            "ls_init_value": 1.0,
        },
        "timm_first_stage_downsample": False,
    },
    "text_cfg": copy.deepcopy(TINY_CLIP_CONFIG["text_cfg"]),
}


def tiny_convnext_clip_config() -> dict[str, Any]:
    """A copy of :data:`TINY_CONVNEXT_CLIP_CONFIG`, as stored in its folder."""
    return copy.deepcopy(TINY_CONVNEXT_CLIP_CONFIG)


def is_convnext_clip(model: open_clip.CLIP) -> bool:
    """True for a CLIP whose image tower is a timm ConvNeXt (fully convolutional: any
    input size, no position table)."""
    return hasattr(model.visual, "trunk") and hasattr(model.visual.trunk, "stages")


#: Preprocessing stored next to the weights (open_clip's ``preprocess_cfg``).
TINY_CLIP_PREPROCESS: dict[str, Any] = {
    "mean": list(open_clip.OPENAI_DATASET_MEAN),
    "std": list(open_clip.OPENAI_DATASET_STD),
    "interpolation": "bicubic",
    "resize_mode": "shortest",
}

DEFAULT_PROMPT = "a photo of a {}."

_VARIANT_NAME = f"{TINY_CLIP_NAME}-variant"
_CONFIG_DIR: tempfile.TemporaryDirectory | None = None


def register_tiny_clip(
    model_cfg: dict[str, Any] | None = None, name: str = TINY_CLIP_NAME
) -> str:
    """Register an open_clip model config under ``name`` and return ``name``.

    With the defaults this registers :data:`TINY_CLIP_CONFIG` (the patchify ViT; a
    ``"conv_stem"`` entry is left out, open_clip cannot build it) as
    :data:`TINY_CLIP_NAME`, after which ``open_clip.get_tokenizer("ovs-shapes-clip")``
    works. The JSON is written to a per-process temporary folder (removed at exit)
    because open_clip's registry reads configs from files. Registering is idempotent.
    """
    global _CONFIG_DIR
    model_cfg = copy.deepcopy(TINY_CLIP_CONFIG if model_cfg is None else model_cfg)
    model_cfg.pop("conv_stem", None)
    if open_clip.get_model_config(name) == model_cfg:
        return name
    if _CONFIG_DIR is None:
        _CONFIG_DIR = tempfile.TemporaryDirectory(prefix="onepass_ovs_open_clip_")
    path = Path(_CONFIG_DIR.name) / f"{name}.json"
    path.write_text(json.dumps(model_cfg, indent=2))
    open_clip.add_model_config(path)
    return name


def _create(model_cfg: dict[str, Any], preprocess_cfg: dict[str, Any] | None = None):
    from ..config import ClipConfig
    from ..models.towers import create_clip

    model = create_clip(ClipConfig(model_name=TINY_CLIP_NAME, model_cfg=copy.deepcopy(model_cfg)))
    preprocess = TINY_CLIP_PREPROCESS if preprocess_cfg is None else preprocess_cfg
    # what open_clip.create_model records for its transforms; images_to_tensor reads them
    model.visual.image_mean = tuple(preprocess.get("mean", TINY_CLIP_PREPROCESS["mean"]))
    model.visual.image_std = tuple(preprocess.get("std", TINY_CLIP_PREPROCESS["std"]))
    return model


def build_tiny_clip(model_cfg: dict[str, Any] | None = None) -> open_clip.CLIP:
    """A randomly initialised tiny CLIP (default :func:`tiny_clip_config`: conv stem),
    built by :func:`onepass_ovs.models.towers.create_clip`, in train mode."""
    return _create(tiny_clip_config() if model_cfg is None else model_cfg)


def save_open_clip_folder(
    model: open_clip.CLIP,
    model_cfg: dict[str, Any],
    output_dir: str | Path,
    preprocess_cfg: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write ``open_clip_config.json`` + ``open_clip_model.safetensors`` to ``output_dir``.

    The layout is what ``open_clip.create_model("local-dir:<dir>")`` and ``hf-hub:``
    loading read. ``extra`` is stored under a top-level ``"onepass_ovs"`` key (open_clip
    ignores unknown keys), e.g. the pretraining recipe and its metrics. ``dtype`` (e.g.
    ``torch.float16``) casts floating-point tensors for storage; open_clip's loader
    copies them back into its fp32 parameters.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    config = {
        "model_cfg": model_cfg,
        "preprocess_cfg": dict(TINY_CLIP_PREPROCESS if preprocess_cfg is None else preprocess_cfg),
    }
    if extra:
        config["onepass_ovs"] = extra
    (output_dir / "open_clip_config.json").write_text(json.dumps(config, indent=2) + "\n")
    state = {}
    for key, value in model.state_dict().items():
        value = value.detach().cpu()
        if dtype is not None and value.is_floating_point():
            value = value.to(dtype)
        state[key] = value.contiguous()
    save_file(state, str(output_dir / "open_clip_model.safetensors"))
    return output_dir


def load_tiny_clip(path: str | Path, image_size: int | None = None) -> open_clip.CLIP:
    """Load a folder written by :func:`save_open_clip_folder` (safetensors + JSON; the
    config's ``model_cfg`` may carry a ``"conv_stem"``, or be the ConvNeXt's with its
    ``timm_model_kwargs``), in eval mode.

    ``image_size`` rebuilds the vision tower for another input size; open_clip's loader
    then bicubically resizes a ViT's learned position table to the new grid (a ConvNeXt
    takes any size anyway).
    """
    from ..hub import OPEN_CLIP_WEIGHTS_NAME, resolve_clip
    from ..models.towers import load_open_clip_weights

    source = resolve_clip(f"local-dir:{Path(path).resolve()}")
    model_cfg = copy.deepcopy(source.model_cfg)
    if image_size is not None:
        model_cfg["vision_cfg"]["image_size"] = int(image_size)
    config = json.loads((Path(path) / "open_clip_config.json").read_text())
    model = _create(model_cfg, config.get("preprocess_cfg"))
    weights = source.weights if source.weights is not None else Path(path) / OPEN_CLIP_WEIGHTS_NAME
    load_open_clip_weights(model, weights)
    return model.eval()


# --------------------------------------------------------------------------------------
# Tensors and features.


def images_to_tensor(
    images: np.ndarray, model: open_clip.CLIP, image_size: int | None = None
) -> torch.Tensor:
    """uint8 RGB ``(N, H, W, 3)`` -> normalised float ``(N, 3, S, S)`` for ``model``.

    Resizes (bicubic, antialiased) to ``image_size`` or the model's input size, then
    applies the model's stored mean/std.
    """
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0
    size = image_size or model.visual.image_size[0]
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
        x = x.clamp(0.0, 1.0)
    mean = torch.tensor(model.visual.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(model.visual.image_std).view(1, 3, 1, 1)
    return (x - mean) / std


@torch.no_grad()
def encode_class_prompts(
    model: open_clip.CLIP,
    tokenizer,
    class_names: list[str] | tuple[str, ...],
    template: str = DEFAULT_PROMPT,
) -> torch.Tensor:
    """L2-normalised text embeddings ``(K, D)`` of ``template.format(name)`` per class."""
    tokens = tokenizer([template.format(name) for name in class_names])
    return model.encode_text(tokens.to(model.logit_scale.device), normalize=True)


def dense_tower(model: open_clip.CLIP, severance: str = "none", blocks=(-1,)):
    """The library's dense adapter around ``model.visual`` (modules shared, not copied).

    ViT: :class:`onepass_ovs.models.towers.DenseViT` (positions interpolated to any grid,
    ``severance`` in ``blocks``). ConvNeXt: :class:`~onepass_ovs.models.towers.DenseConvNeXt`
    (the trunk's last feature map through the tower's head per pixel, SED's dense
    embedding; ``severance`` must be ``"none"``).
    """
    from ..models.towers import DenseConvNeXt, DenseViT

    if is_convnext_clip(model):
        if severance != "none":
            raise ValueError(f"a ConvNeXt CLIP has no attention to sever (severance={severance!r})")
        return DenseConvNeXt(model.visual)
    return DenseViT(model.visual, severance=severance, severance_blocks=blocks)


@torch.no_grad()
def patch_features(
    model: open_clip.CLIP, pixels: torch.Tensor, sever_last_block: bool = False
) -> torch.Tensor:
    """Dense CLIP features, L2-normalised: a ViT's patch tokens after ``ln_post`` and
    ``proj``, or a ConvNeXt's last feature map through its head per pixel.

    Runs the library's dense adapter (:func:`dense_tower`; any input size: a ViT's
    positions are interpolated bicubically).

    Args:
        pixels: ``(B, 3, H, W)`` normalised images, sides multiples of the patch (ViT) or
            of the last stage's stride (ConvNeXt).
        sever_last_block: replace the last block's attention by the identity (each token
            attends only to itself: ``out_proj(v_l)``), the "identity" patch severance a
            one-pass segmenter applies so that token features stay local (ViT only).

    Returns:
        ``(B, h, w, D)`` features on the ``h x w = H/stride x W/stride`` grid.
    """
    tower = dense_tower(model, "identity" if sever_last_block else "none")
    dense, (h, w) = tower(pixels)
    return dense.reshape(pixels.shape[0], h, w, -1)


# --------------------------------------------------------------------------------------
# Evaluation.


@torch.no_grad()
def evaluate_tiny_clip(
    model: open_clip.CLIP,
    tokenizer=None,
    *,
    seed: int = 0,
    scenes_per_class: int = 20,
    num_region_scenes: int = 300,
    scene_size: int = scenes.REFERENCE_SIZE,
    image_size: int | None = None,
    batch_size: int = 100,
) -> dict[str, float]:
    """Measure what the downstream needs from the CLIP.

    - ``zero_shot_{seen,unseen}``: 30-way classification of single-object scenes against
      ``"a photo of a {class}."`` ("an" before vowels, as in the captions; global image
      embedding).
    - ``region_{seen,unseen}``: 30-way classification of each object in 2-4 object scenes
      from its mask-average-pooled patch features (weights = fraction of each patch
      covered by the object's visible pixels); ``region_severed_*`` does the same with
      the last block's attention replaced by the identity (see :func:`patch_features`;
      ViT only). For a ConvNeXt CLIP the dense features are SED's: the last stage's map
      through the tower's head per pixel.

    Scenes are rendered at ``scene_size`` and resized to ``image_size`` (default: the
    model's input size). They come from the evaluation streams ``[EVAL_STREAM, seed, 0]``
    and ``[EVAL_STREAM, seed, 1]``, which no pretraining stream shares (module docstring),
    so the numbers are on fresh scenes and reproducible. BatchNorm runs in eval mode.
    """
    model.eval()
    device = next(model.parameters()).device
    if tokenizer is None:
        tokenizer = _tokenizer(model)
    object_names = list(scenes.CLASS_NAMES[1:])
    # "a photo of an orange star.": the articles the captions use
    text = encode_class_prompts(
        model, tokenizer, [scenes.with_article(n) for n in object_names], "a photo of {}."
    ).float().cpu()
    unseen = np.isin(np.arange(1, len(scenes.CLASS_NAMES)), [
        scenes.class_id(n) for n in scenes.UNSEEN_CLASSES
    ])
    results: dict[str, float] = {}

    # (a) zero-shot on single-object scenes.
    rng = np.random.default_rng([EVAL_STREAM, seed, 0])
    targets = np.repeat(np.arange(len(object_names)), scenes_per_class)
    images = np.stack([
        scenes.render_scene(rng, scene_size, classes=[object_names[t]]).image for t in targets
    ])
    predictions = []
    for start in range(0, len(images), batch_size):
        pixels = images_to_tensor(images[start:start + batch_size], model, image_size)
        feats = _encode_image(model, pixels.to(device)).float().cpu()
        predictions.append((feats @ text.T).argmax(dim=-1).numpy())
    correct = np.concatenate(predictions) == targets
    results["zero_shot_seen"] = float(correct[~unseen[targets]].mean())
    results["zero_shot_unseen"] = float(correct[unseen[targets]].mean())

    # (b) mask-average pooling of patch features in multi-object scenes.
    rng = np.random.default_rng([EVAL_STREAM, seed, 1])
    region_scenes = [
        scenes.render_scene(rng, scene_size, num_objects=int(rng.integers(2, 5)))
        for _ in range(num_region_scenes)
    ]
    for severed in (False,) if is_convnext_clip(model) else (False, True):
        hits, is_unseen = [], []
        for start in range(0, len(region_scenes), batch_size):
            chunk = region_scenes[start:start + batch_size]
            pixels = images_to_tensor(np.stack([s.image for s in chunk]), model, image_size)
            feats = patch_features(model, pixels.to(device), severed).float().cpu()
            grid = feats.shape[1:3]
            for scene, feat in zip(chunk, feats, strict=True):
                for obj in scene.objects:
                    mask = torch.from_numpy(scene.label == obj.class_id).float()[None, None]
                    weight = F.adaptive_avg_pool2d(mask, grid)[0, 0]
                    if weight.sum() <= 0:
                        continue
                    pooled = (weight[..., None] * feat).sum(dim=(0, 1)) / weight.sum()
                    hits.append(int((pooled @ text.T).argmax()) == obj.class_id - 1)
                    is_unseen.append(bool(unseen[obj.class_id - 1]))
        hits_arr, unseen_arr = np.array(hits), np.array(is_unseen)
        prefix = "region_severed" if severed else "region"
        results[f"{prefix}_seen"] = float(hits_arr[~unseen_arr].mean())
        results[f"{prefix}_unseen"] = float(hits_arr[unseen_arr].mean())
    return results


def _encode_image(model: open_clip.CLIP, pixels: torch.Tensor) -> torch.Tensor:
    """Normalised global embeddings (B, E) at any input size (``encode_image`` at the
    model's own size; positions interpolated by the dense adapter otherwise; a ConvNeXt
    takes any size)."""
    if is_convnext_clip(model) or tuple(pixels.shape[-2:]) == tuple(model.visual.image_size):
        return model.encode_image(pixels, normalize=True)
    return F.normalize(dense_tower(model).global_embedding(pixels), dim=-1)


def _tokenizer(model: open_clip.CLIP):
    from ..models.towers import create_tokenizer

    return create_tokenizer({"text_cfg": {"context_length": model.context_length}})


# --------------------------------------------------------------------------------------
# Pretraining.


def _param_groups(model: torch.nn.Module, lr: float, weight_decay: float) -> list[dict[str, Any]]:
    # Same split as open_clip's trainer: no decay on gains, biases, 1-d embeddings, scale.
    def exclude(name: str, param: torch.Tensor) -> bool:
        return (
            param.ndim < 2 or "bn" in name or "ln" in name or "bias" in name
            or "logit_scale" in name
        )

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = []
    for decay in (False, True):
        members = [(n, p) for n, p in named if exclude(n, p) != decay]
        groups.append({
            "params": [p for _, p in members],
            "param_names": [n for n, _ in members],
            "lr": lr,
            "weight_decay": weight_decay if decay else 0.0,
        })
    return groups


def _confusable_group(rng: np.random.Generator, group_size: int, num_objects: int):
    """``group_size`` distinct class lists that differ only in shapes, colours or bindings.

    Random scenes can almost always be told apart by their colours alone, so a contrastive
    batch of them never teaches shape. Within a group every scene has the same number of
    objects and each is a mutation of the first: new shapes for the same colours, new
    colours for the same shapes, or the same colours and shapes bound differently
    ("red circle + blue square" vs "blue circle + red square").
    """
    num_colours, num_shapes = len(scenes.COLOURS), len(scenes.SHAPES)
    first = rng.choice(num_colours * num_shapes, size=num_objects, replace=False)
    colours, shapes = first // num_shapes, first % num_shapes
    group = [tuple(sorted(first.tolist()))]
    for _attempt in range(50 * group_size):
        if len(group) == group_size:
            break
        mode = rng.random()
        if mode < 0.5:
            new_colours, new_shapes = colours, rng.integers(num_shapes, size=num_objects)
        elif mode < 0.75 or num_objects == 1:
            new_colours, new_shapes = rng.integers(num_colours, size=num_objects), shapes
        else:
            new_colours, new_shapes = colours, rng.permutation(shapes)
        ids = tuple(sorted((new_colours * num_shapes + new_shapes).tolist()))
        if len(set(ids)) == num_objects and ids not in group:
            group.append(ids)
    return [[scenes.CLASS_NAMES[1 + i] for i in rng.permutation(ids)] for ids in group]


def _training_batch(
    seed: int,
    step: int,
    batch_size: int,
    image_size: int,
    *,
    group_size: int,
    single_object_fraction: float,
    max_objects: int = scenes.MAX_OBJECTS,
    object_size: tuple[float, float] = scenes.OBJECT_SIZE_RANGE,
) -> tuple[np.ndarray, list[str]]:
    """Fresh scenes for one step, a deterministic function of ``(seed, step)`` (streams
    ``[TRAIN_STREAM, seed, step, ...]``).

    Returns ``(N, S, S, 3)`` uint8 images and their captions. Scenes come in groups of
    ``group_size`` confusable scenes (see :func:`_confusable_group`); a group has one
    object with probability ``single_object_fraction``, else 2 to ``max_objects``.
    """
    rng = np.random.default_rng([TRAIN_STREAM, seed, step])
    class_lists: list[list[str]] = []
    while len(class_lists) < batch_size:
        single = rng.random() < single_object_fraction
        num_objects = 1 if single else int(rng.integers(2, max_objects + 1))
        class_lists.extend(_confusable_group(rng, group_size, num_objects))
    images = np.empty((batch_size, image_size, image_size, 3), dtype=np.uint8)
    captions = []
    for k, classes in enumerate(class_lists[:batch_size]):
        scene = scenes.render_scene(
            np.random.default_rng([TRAIN_STREAM, seed, step, k]), image_size, classes=classes,
            object_size=object_size,
        )
        images[k] = scene.image
        captions.append(scene.caption)
    return images, captions


def _encode_image_windows(
    model: open_clip.CLIP, pixels: torch.Tensor, offsets: torch.Tensor
) -> torch.Tensor:
    """Image embeddings of crops, each placed at a window of the full position table.

    A ``(B, 3, c, c)`` crop of a scene has a ``c/p x c/p`` token grid; crop ``b`` takes
    the learned positions of the window whose top-left token is ``offsets[b]`` (``(B, 2)``
    rows, cols) in the model's own ``h x w`` grid. The crop is thus seen exactly as
    that part of a full-size image would be, at a fraction of the cost. Otherwise this
    is open_clip's ``VisionTransformer.forward`` with the same modules.

    Returns:
        ``(B, D)`` unnormalised image embeddings.
    """
    visual = model.visual
    x = visual.conv1(pixels)
    batch, _, h, w = x.shape
    x = x.flatten(2).transpose(1, 2)
    grid_w = visual.grid_size[1]
    rows = offsets[:, 0, None, None] + torch.arange(h, device=offsets.device)[None, :, None]
    cols = offsets[:, 1, None, None] + torch.arange(w, device=offsets.device)[None, None, :]
    table = visual.positional_embedding
    x = x + table[1 + (rows * grid_w + cols).flatten(1)].to(x.dtype)
    cls = (visual.class_embedding + table[0]).to(x.dtype).expand(batch, 1, -1)
    x = visual.ln_pre(torch.cat([cls, x], dim=1))
    x = visual.transformer(x)
    pooled, _ = visual._pool(x)
    return pooled @ visual.proj


class _PretrainSteps(torch.utils.data.Dataset):
    """One item per optimizer step: the whole contrastive batch of that step.

    The engine reads item ``order[k]`` at step ``k`` (its data order, a permutation of
    ``range(steps)`` seeded by the run's seed, batch size 1); this dataset inverts that
    order so that the item read at step ``k`` is step ``k``'s batch, which the
    curriculum (crops first, single objects first) needs. The batch is a pure function
    of ``(seed, step)``, so exact resume holds.

    Item: ``{"pixels": (N, 3, S, S) float, "tokens": (N, context) long, "offsets":
    (N, 2) long (a ViT's crop phase; (0, 2) at full resolution and for a ConvNeXt)}``.
    """

    def __init__(self, *, steps: int, order_seed: int, plan: dict[str, Any], tokenizer):
        from ..training.sampling import SampleOrder

        order = SampleOrder(steps, seed=order_seed).epoch_shard(0)
        self.step_of_index = [0] * steps
        for step, index in enumerate(order):
            self.step_of_index[index] = step
        self.plan = plan
        self.tokenizer = tokenizer

    def __len__(self) -> int:
        return len(self.step_of_index)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        plan = self.plan
        step = self.step_of_index[index]
        seed, full_size = plan["seed"], plan["full_size"]
        cropped = step < plan["crop_steps"]
        single = 1.0 if step < plan["single_object_steps"] else plan["single_object_fraction"]
        if cropped:
            crop = plan["crop_size"]
            images, captions = _training_batch(
                seed, step, plan["batch_size"], crop, group_size=plan["group_size"],
                single_object_fraction=single, max_objects=3,
                object_size=tuple(b * full_size / crop for b in scenes.OBJECT_SIZE_RANGE),
            )
            if plan["patch"]:  # ViT: each crop at a window of the position table
                max_offset = (full_size - crop) // plan["patch"]
                offsets = torch.from_numpy(
                    np.random.default_rng([TRAIN_STREAM, seed, step, 1]).integers(
                        0, max_offset + 1, (len(images), 2)
                    )
                )
            else:  # fully convolutional: the crop as it is
                offsets = torch.zeros(0, 2, dtype=torch.long)
        else:
            images, captions = _training_batch(
                seed, step, plan["full_res_batch_size"], full_size,
                group_size=plan["group_size"], single_object_fraction=single,
            )
            offsets = torch.zeros(0, 2, dtype=torch.long)
        x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0
        mean = torch.tensor(plan["mean"]).view(1, 3, 1, 1)
        std = torch.tensor(plan["std"]).view(1, 3, 1, 1)
        return {"pixels": (x - mean) / std, "tokens": self.tokenizer(captions), "offsets": offsets}


def _only_item(items: list[Any]) -> Any:
    return items[0]


class _ClipLoss:
    """``loss_fn(model, batch)`` for the engine: open_clip's contrastive loss."""

    def __init__(self):
        self.loss = open_clip.ClipLoss()

    def __call__(self, model: open_clip.CLIP, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
        with torch.no_grad():
            # CLIP's cap on the temperature (logit scale <= 100), applied to the result of
            # the previous update before it is used.
            model.logit_scale.clamp_(0, math.log(100))
        pixels, offsets = batch["pixels"], batch["offsets"]
        if offsets.shape[0]:
            image = F.normalize(_encode_image_windows(model, pixels, offsets), dim=-1)
        else:
            image = model.encode_image(pixels, normalize=True)
        text = model.encode_text(batch["tokens"], normalize=True)
        scale = model.logit_scale.exp()
        loss = self.loss(image.float(), text.float(), scale.float())
        return {"loss": loss, "logit_scale": scale.detach().float()}


@dataclass
class PretrainResult:
    """What :func:`pretrain_tiny_clip` produced; ``model`` is the trained CLIP in eval mode."""

    model: open_clip.CLIP
    output_dir: Path
    seconds: float
    seconds_per_step: float
    final_loss: float
    metrics: dict[str, float] = field(default_factory=dict)
    eval_seconds: float = 0.0

    def summary(self) -> dict[str, Any]:
        """JSON-friendly numbers (everything but the model)."""
        return {
            "seconds": round(self.seconds, 2),
            "seconds_per_step": round(self.seconds_per_step, 4),
            "final_loss": round(self.final_loss, 4),
            "eval_seconds": round(self.eval_seconds, 2),
            "metrics": self.metrics,
        }


def pretrain_tiny_clip(
    output_dir: str | Path,
    steps: int = 2000,
    batch_size: int = 128,
    seed: int = 0,
    *,
    model_cfg: dict[str, Any] | None = None,
    lr: float = 5e-4,
    weight_decay: float = 0.1,
    warmup_steps: int | None = None,
    crop_size: int | None = 64,
    full_res_fraction: float = 0.1,
    full_res_batch_size: int = 64,
    group_size: int = 4,
    single_object_fraction: float = 0.25,
    single_object_warmup: float = 0.3,
    bf16: bool = True,
    evaluate: bool = True,
    progress: bool = True,
    resume: bool | str = False,
    checkpoint_every: int = 500,
    log_every: int = 20,
    num_workers: int = 0,
    device: str | None = None,
) -> PretrainResult:
    """Contrastively pretrain the tiny CLIP on freshly rendered (scene, caption) pairs.

    Each step renders new scenes, tokenises their image-level captions and minimises
    ``open_clip.ClipLoss`` with AdamW (betas 0.9/0.98, eps 1e-6; no decay on gains,
    biases and the logit scale) and a linear warmup times cosine schedule, on the
    library's engine (:class:`~onepass_ovs.training.trainer.Trainer`): checkpoints every
    ``checkpoint_every`` steps, exact resume (``resume="auto"``), ``train_log.jsonl``.
    Seeds fix the initialisation and the data; on a CPU a run is bit-exact for a given
    thread count, resumed or not. The stem's BatchNorm trains in train mode; the model
    returned (and evaluated) is in eval mode.

    Two phases share one schedule:

    1. Crops (the first ``1 - full_res_fraction`` of the steps): ``crop_size`` px scenes
       whose objects have their full-resolution pixel size; a ViT places each at a
       random window of its position table (:func:`_encode_image_windows`), a ConvNeXt
       (fully convolutional, no positions) just runs on the crop. Features then see
       objects at the scale of full-size scenes for a quarter of the cost.
    2. Full resolution (the rest): whole scenes at the model's input size, so pooling
       and positions adapt to full images with 1-4 objects.

    Batches are groups of ``group_size`` confusable scenes (same colours with other
    shapes, same shapes with other colours, swapped bindings): random scenes are told
    apart by colour alone, and the CLIP would never learn shape.

    Args:
        output_dir: the run folder; receives ``open_clip_config.json`` and
            ``open_clip_model.safetensors`` (see :func:`load_tiny_clip`) at the end,
            next to the engine's ``config.json``, ``train_log.jsonl``, ``checkpoints/``.
        steps: optimiser steps, both phases together.
        batch_size: scenes per crop-phase step (also the number of in-batch negatives).
        seed: seeds the initialisation, the engine and the scene stream.
        model_cfg: model config (default :func:`tiny_clip_config`, with the conv stem;
            :func:`tiny_convnext_clip_config` for the ConvNeXt).
        crop_size: crop side in px (a multiple of the patch size, or of a ConvNeXt's
            last stride); ``None`` trains on full-resolution scenes only.
        full_res_fraction: share of the steps (the last ones) on full-resolution scenes.
        full_res_batch_size: scenes per full-resolution step.
        group_size: scenes per group of confusable scenes; 1 gives independent scenes.
        single_object_fraction: probability that a group holds single-object scenes.
        single_object_warmup: share of the steps (the first ones) that use only
            single-object scenes (a curriculum: shapes before compositions).
        bf16: bfloat16 autocast for the forward pass.
        evaluate: run :func:`evaluate_tiny_clip` at the end and store the metrics.
        resume: ``False`` (fresh; refuses a folder holding checkpoints), ``"auto"``
            (continue from the newest checkpoint, fresh if none) or a checkpoint folder.
        num_workers: loader processes rendering scenes (0 = in the training process).
        device: ``None`` = CUDA when available, else CPU.

    Global torch settings (thread counts) are left alone; set ``OMP_NUM_THREADS``.

    Returns:
        A :class:`PretrainResult` (the trained model, timings, final loss, metrics).
    """
    from ..training.config import TrainConfig
    from ..training.sampling import seed_everything
    from ..training.trainer import LOG_NAME, Trainer

    model_cfg = copy.deepcopy(tiny_clip_config() if model_cfg is None else model_cfg)
    output_dir = Path(output_dir)
    seed_everything(seed)
    model = build_tiny_clip(model_cfg)
    stem = getattr(model.visual, "conv1", None)
    if hasattr(stem, "batch_statistics"):
        stem.batch_statistics = True  # BatchNorm in train mode while pretraining
    tokenizer = _tokenizer(model)
    full_size = model.visual.image_size[0]
    convnext = is_convnext_clip(model)
    patch = None if convnext else model.visual.patch_size[0]
    if convnext:
        from ..models.towers import DenseConvNeXt

        multiple = DenseConvNeXt(model.visual).stride  # sides the trunk divides evenly
    else:
        multiple = patch
    if crop_size is not None and (crop_size % multiple or crop_size > full_size):
        raise ValueError(
            f"crop_size must be a multiple of {multiple} and <= {full_size}, got {crop_size}"
        )
    crop_steps = 0 if crop_size is None else steps - int(round(full_res_fraction * steps))
    warmup = warmup_steps if warmup_steps is not None else max(1, steps // 20)
    plan = {
        "seed": seed,
        "full_size": full_size,
        "patch": patch,
        "crop_size": crop_size,
        "crop_steps": crop_steps,
        "batch_size": batch_size,
        "full_res_batch_size": full_res_batch_size,
        "group_size": group_size,
        "single_object_fraction": single_object_fraction,
        "single_object_steps": int(single_object_warmup * steps),
        "mean": list(model.visual.image_mean),
        "std": list(model.visual.image_std),
    }
    config = TrainConfig(
        steps=steps, batch_size=1, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.98),
        eps=1e-6, lr_schedule="cosine", warmup_steps=warmup,
        amp="bf16" if bf16 else "none", log_every=log_every,
        checkpoint_every=checkpoint_every, keep_checkpoints=2, seed=seed,
        num_workers=num_workers, output_dir=str(output_dir), device=device,
        progress_bar=progress,
    )
    dataset = _PretrainSteps(steps=steps, order_seed=seed, plan=plan, tokenizer=tokenizer)
    trainer = Trainer(
        model, _ClipLoss(), dataset, config, collate_fn=_only_item,
        param_groups=_param_groups(model, lr, weight_decay),
    )
    start = time.perf_counter()
    start_step = 0
    if resume:
        from ..training import checkpoints

        existing = checkpoints.list_checkpoints(output_dir)
        start_step = existing[-1][0] if existing else 0
    model = trainer.fit(resume=resume)
    seconds = time.perf_counter() - start
    with torch.no_grad():
        model.logit_scale.clamp_(0, math.log(100))
    if hasattr(stem, "batch_statistics"):
        stem.batch_statistics = False  # stored statistics from now on, in any mode
    model.eval()

    losses = [
        json.loads(line)["loss"]
        for line in (output_dir / LOG_NAME).read_text().splitlines() if line.strip()
    ] if (output_dir / LOG_NAME).is_file() else []
    recipe = {
        "steps": steps,
        "batch_size": batch_size,
        "seed": seed,
        "lr": lr,
        "weight_decay": weight_decay,
        "warmup_steps": warmup,
        "crop_size": crop_size,
        "crop_steps": crop_steps,
        "full_res_batch_size": full_res_batch_size,
        "group_size": group_size,
        "single_object_fraction": single_object_fraction,
        "single_object_warmup": single_object_warmup,
        "bf16": bf16,
        "tower": "convnext" if convnext else "vit",
        "conv_stem": model_cfg.get("conv_stem", []),
    }
    trained_steps = max(1, steps - start_step)
    result = PretrainResult(
        model=model,
        output_dir=output_dir,
        seconds=seconds,
        seconds_per_step=seconds / trained_steps,
        final_loss=float(np.mean(losses[-3:])) if losses else float("nan"),
    )
    if evaluate:
        t = time.perf_counter()
        result.metrics = evaluate_tiny_clip(model, tokenizer)
        result.eval_seconds = time.perf_counter() - t
    save_open_clip_folder(model, model_cfg, output_dir, extra={"recipe": recipe, **result.summary()})
    return result


def main(argv: list[str] | None = None) -> None:
    """``python -m onepass_ovs.toy.clip --output DIR --steps N [--tower convnext]``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", required=True, help="run folder (the CLIP + the engine's files)")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--crop-size", type=int, default=64, help="0 = full resolution only")
    parser.add_argument("--full-res-fraction", type=float, default=0.1)
    parser.add_argument("--full-res-batch-size", type=int, default=64)
    parser.add_argument("--tower", choices=("vit", "convnext"), default="vit",
                        help="image tower: the conv-stem ViT or the tiny ConvNeXt (SED's)")
    parser.add_argument("--pool", choices=("tok", "avg"), default=None)
    parser.add_argument("--patchify", action="store_true",
                        help="open_clip's patchify conv instead of the conv stem")
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--single-object-fraction", type=float, default=0.25)
    parser.add_argument("--single-object-warmup", type=float, default=0.3)
    parser.add_argument("--fp32", action="store_true", help="no bfloat16 autocast")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
    parser.add_argument("--checkpoint-every", type=int, default=500)
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--device", default=None)
    parser.add_argument("--no-eval", action="store_true")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    if args.tower == "convnext":
        if args.patchify or args.pool:
            parser.error("--patchify and --pool apply to the ViT tower only")
        model_cfg = tiny_convnext_clip_config()
    else:
        model_cfg = tiny_clip_config(None if args.patchify else TINY_CLIP_CONV_STEM)
    if args.pool:
        model_cfg["vision_cfg"]["pool_type"] = args.pool
    result = pretrain_tiny_clip(
        args.output,
        steps=args.steps,
        batch_size=args.batch_size,
        seed=args.seed,
        model_cfg=model_cfg,
        lr=args.lr,
        crop_size=args.crop_size or None,
        full_res_fraction=args.full_res_fraction,
        full_res_batch_size=args.full_res_batch_size,
        group_size=args.group_size,
        single_object_fraction=args.single_object_fraction,
        single_object_warmup=args.single_object_warmup,
        bf16=not args.fp32,
        evaluate=not args.no_eval,
        resume="auto" if args.resume else False,
        checkpoint_every=args.checkpoint_every,
        num_workers=args.num_workers,
        device=args.device,
        progress=not args.no_progress,
    )
    print(json.dumps({"output_dir": str(result.output_dir), **result.summary()}, indent=2))


if __name__ == "__main__":
    main()
