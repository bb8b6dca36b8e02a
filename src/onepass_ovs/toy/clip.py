"""A tiny open_clip model for the shapes world, and its contrastive pretraining.

The architecture is data (an open_clip model config registered under
:data:`TINY_CLIP_NAME`), the model is built by ``open_clip.create_model``, the loss is
``open_clip.ClipLoss`` and the output folder is open_clip's Hub layout
(``open_clip_config.json`` + ``open_clip_model.safetensors``), so everything downstream
treats the result like any other open_clip checkpoint::

    model = open_clip.create_model("local-dir:runs/tiny_clip")
    tokenizer = open_clip.get_tokenizer("local-dir:runs/tiny_clip")

The CLIP only ever sees image-level captions (``scenes.make_caption``); unseen classes
are unseen only for segmentation training later, so they do appear here.
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
    "PretrainResult",
    "TINY_CLIP_CONFIG",
    "TINY_CLIP_NAME",
    "TINY_CLIP_PREPROCESS",
    "build_tiny_clip",
    "encode_class_prompts",
    "evaluate_tiny_clip",
    "load_tiny_clip",
    "patch_features",
    "pretrain_tiny_clip",
    "register_tiny_clip",
    "save_open_clip_folder",
    "images_to_tensor",
]

logger = logging.getLogger(__name__)

TINY_CLIP_NAME = "ovs-shapes-clip"

#: open_clip model config. Patch 8 gives a 16 x 16 token grid on 128 px scenes; the text
#: tower is narrow because its 49408-row token table (open_clip's standard BPE) dominates
#: the parameter count.
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
    """Register a model config with open_clip under ``name`` and return ``name``.

    With the defaults this registers :data:`TINY_CLIP_CONFIG` as
    :data:`TINY_CLIP_NAME`, after which ``open_clip.create_model("ovs-shapes-clip")`` and
    ``open_clip.get_tokenizer("ovs-shapes-clip")`` work. The JSON is written to a
    per-process temporary folder (removed at exit) because open_clip's registry reads
    configs from files. Registering is idempotent.
    """
    global _CONFIG_DIR
    model_cfg = TINY_CLIP_CONFIG if model_cfg is None else model_cfg
    if open_clip.get_model_config(name) == model_cfg:
        return name
    if _CONFIG_DIR is None:
        _CONFIG_DIR = tempfile.TemporaryDirectory(prefix="onepass_ovs_open_clip_")
    path = Path(_CONFIG_DIR.name) / f"{name}.json"
    path.write_text(json.dumps(model_cfg, indent=2))
    open_clip.add_model_config(path)
    return name


def build_tiny_clip(model_cfg: dict[str, Any] | None = None, **create_kwargs) -> open_clip.CLIP:
    """A randomly initialised tiny CLIP, built by ``open_clip.create_model``.

    A ``model_cfg`` other than :data:`TINY_CLIP_CONFIG` is registered as
    ``"ovs-shapes-clip-variant"`` so that the standard name always means the standard
    architecture.
    """
    is_default = model_cfg is None or model_cfg == TINY_CLIP_CONFIG
    name = register_tiny_clip(model_cfg, TINY_CLIP_NAME if is_default else _VARIANT_NAME)
    return open_clip.create_model(name, force_preprocess_cfg=TINY_CLIP_PREPROCESS, **create_kwargs)


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
    """Load a folder written by :func:`save_open_clip_folder` through open_clip's loader.

    ``image_size`` rebuilds the vision tower for another input size; open_clip's loader
    then bicubically resizes the learned position table to the new grid.
    """
    model = open_clip.create_model(f"local-dir:{Path(path).resolve()}", force_image_size=image_size)
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
    return model.encode_text(tokens, normalize=True)


@torch.no_grad()
def patch_features(
    model: open_clip.CLIP, pixels: torch.Tensor, sever_last_block: bool = False
) -> torch.Tensor:
    """Dense CLIP features: patch tokens after ``ln_post`` and ``proj``, L2-normalised.

    Args:
        pixels: ``(B, 3, S, S)`` normalised images; ``S`` must match the model's grid.
        sever_last_block: replace the last block's attention by the identity (each token
            attends only to itself: ``out_proj(v_l)``), the "identity" patch severance a
            one-pass segmenter applies so that token features stay local.

    Returns:
        ``(B, h, w, D)`` features on the ``h x w = S/patch`` grid.
    """
    visual = model.visual
    x = visual._embeds(pixels)
    blocks = visual.transformer.resblocks
    last = len(blocks) - 1 if sever_last_block else len(blocks)
    for block in blocks[:last]:
        x = block(x)
    if sever_last_block:
        block = blocks[-1]
        attn = block.attn
        width = x.shape[-1]
        y = block.ln_1(x)
        value = F.linear(y, attn.in_proj_weight[2 * width:], attn.in_proj_bias[2 * width:])
        x = x + block.ls_1(attn.out_proj(value))
        x = x + block.ls_2(block.mlp(block.ln_2(x)))
    tokens = visual.ln_post(x[:, 1:]) @ visual.proj
    h, w = visual.grid_size
    return F.normalize(tokens, dim=-1).reshape(x.shape[0], h, w, -1)


# --------------------------------------------------------------------------------------
# Evaluation.


@torch.no_grad()
def evaluate_tiny_clip(
    model: open_clip.CLIP,
    tokenizer=None,
    *,
    seed: int = 12345,
    scenes_per_class: int = 20,
    num_region_scenes: int = 300,
    scene_size: int = scenes.REFERENCE_SIZE,
    image_size: int | None = None,
    batch_size: int = 100,
) -> dict[str, float]:
    """Measure what the downstream needs from the CLIP.

    - ``zero_shot_{seen,unseen}``: 30-way classification of single-object scenes against
      ``"a photo of a {class}."`` (global image embedding).
    - ``region_{seen,unseen}``: 30-way classification of each object in 2-4 object scenes
      from its mask-average-pooled patch features (weights = fraction of each patch
      covered by the object's visible pixels); ``region_severed_*`` does the same with
      the last block's attention replaced by the identity (see :func:`patch_features`).

    Scenes are rendered at ``scene_size`` and resized to ``image_size`` (default: the
    model's input size). Seeds are fixed, so the numbers are reproducible.
    """
    model.eval()
    if tokenizer is None:
        tokenizer = open_clip.get_tokenizer(TINY_CLIP_NAME, context_length=model.context_length)
    object_names = list(scenes.CLASS_NAMES[1:])
    text = encode_class_prompts(model, tokenizer, object_names)
    unseen = np.isin(np.arange(1, len(scenes.CLASS_NAMES)), [
        scenes.class_id(n) for n in scenes.UNSEEN_CLASSES
    ])
    results: dict[str, float] = {}

    # (a) zero-shot on single-object scenes.
    rng = np.random.default_rng([seed, 0])
    targets = np.repeat(np.arange(len(object_names)), scenes_per_class)
    images = np.stack([
        scenes.render_scene(rng, scene_size, classes=[object_names[t]]).image for t in targets
    ])
    predictions = []
    for start in range(0, len(images), batch_size):
        pixels = images_to_tensor(images[start:start + batch_size], model, image_size)
        feats = _encode_image(model, pixels)
        predictions.append((feats @ text.T).argmax(dim=-1).numpy())
    correct = np.concatenate(predictions) == targets
    results["zero_shot_seen"] = float(correct[~unseen[targets]].mean())
    results["zero_shot_unseen"] = float(correct[unseen[targets]].mean())

    # (b) mask-average pooling of patch features in multi-object scenes.
    rng = np.random.default_rng([seed, 1])
    region_scenes = [
        scenes.render_scene(rng, scene_size, num_objects=int(rng.integers(2, 5)))
        for _ in range(num_region_scenes)
    ]
    for severed in (False, True):
        hits, is_unseen = [], []
        for start in range(0, len(region_scenes), batch_size):
            chunk = region_scenes[start:start + batch_size]
            pixels = images_to_tensor(np.stack([s.image for s in chunk]), model, image_size)
            feats = _patch_features_any_size(model, pixels, severed)
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
    if pixels.shape[-1] == model.visual.image_size[0]:
        return model.encode_image(pixels, normalize=True)
    with _resized_positions(model, pixels.shape[-1]):
        return model.encode_image(pixels, normalize=True)


def _patch_features_any_size(model, pixels, severed):
    if pixels.shape[-1] == model.visual.image_size[0]:
        return patch_features(model, pixels, severed)
    with _resized_positions(model, pixels.shape[-1]):
        return patch_features(model, pixels, severed)


class _resized_positions:
    """Temporarily run the vision tower at another square input size (bicubic positions)."""

    def __init__(self, model: open_clip.CLIP, size: int):
        self.visual = model.visual
        self.size = size

    def __enter__(self):
        visual = self.visual
        self.saved = (visual.positional_embedding, visual.grid_size, visual.image_size)
        patch = visual.patch_size[0]
        old_grid = visual.grid_size
        new_grid = (self.size // patch, self.size // patch)
        table = visual.positional_embedding.detach()
        grid_table = table[1:].reshape(1, *old_grid, -1).permute(0, 3, 1, 2)
        grid_table = F.interpolate(
            grid_table, size=new_grid, mode="bicubic", antialias=True, align_corners=False
        )
        grid_table = grid_table.permute(0, 2, 3, 1).reshape(new_grid[0] * new_grid[1], -1)
        visual.positional_embedding = torch.nn.Parameter(
            torch.cat([table[:1], grid_table]), requires_grad=False
        )
        visual.grid_size = new_grid
        visual.image_size = (self.size, self.size)
        return self

    def __exit__(self, *exc):
        visual = self.visual
        visual.positional_embedding, visual.grid_size, visual.image_size = self.saved
        return False


# --------------------------------------------------------------------------------------
# Pretraining.


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    # Same split as open_clip's trainer: no decay on gains, biases, 1-d embeddings, scale.
    def exclude(name: str, param: torch.Tensor) -> bool:
        return (
            param.ndim < 2 or "bn" in name or "ln" in name or "bias" in name
            or "logit_scale" in name
        )

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [
        {"params": [p for n, p in named if exclude(n, p)], "weight_decay": 0.0},
        {"params": [p for n, p in named if not exclude(n, p)], "weight_decay": weight_decay},
    ]


def _cosine_with_warmup(warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


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
    """Fresh scenes for one step, a deterministic function of ``(seed, step)``.

    Returns ``(N, S, S, 3)`` uint8 images and their captions. Scenes come in groups of
    ``group_size`` confusable scenes (see :func:`_confusable_group`); a group has one
    object with probability ``single_object_fraction``, else 2 to ``max_objects``.
    """
    rng = np.random.default_rng([seed, step])
    class_lists: list[list[str]] = []
    while len(class_lists) < batch_size:
        single = rng.random() < single_object_fraction
        num_objects = 1 if single else int(rng.integers(2, max_objects + 1))
        class_lists.extend(_confusable_group(rng, group_size, num_objects))
    images = np.empty((batch_size, image_size, image_size, 3), dtype=np.uint8)
    captions = []
    for k, classes in enumerate(class_lists[:batch_size]):
        scene = scenes.render_scene(
            np.random.default_rng([seed, step, k]), image_size, classes=classes,
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
    rows = offsets[:, 0, None, None] + torch.arange(h)[None, :, None]
    cols = offsets[:, 1, None, None] + torch.arange(w)[None, None, :]
    table = visual.positional_embedding
    x = x + table[1 + (rows * grid_w + cols).flatten(1)].to(x.dtype)
    cls = (visual.class_embedding + table[0]).to(x.dtype).expand(batch, 1, -1)
    x = visual.ln_pre(torch.cat([cls, x], dim=1))
    x = visual.transformer(x)
    pooled, _ = visual._pool(x)
    return pooled @ visual.proj


@dataclass
class PretrainResult:
    """What :func:`pretrain_tiny_clip` produced; ``model`` is the trained CLIP in eval mode."""

    model: open_clip.CLIP
    output_dir: Path
    seconds: float
    seconds_per_step: float
    final_loss: float
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """JSON-friendly numbers (everything but the model)."""
        return {
            "seconds": round(self.seconds, 2),
            "seconds_per_step": round(self.seconds_per_step, 4),
            "final_loss": round(self.final_loss, 4),
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
    num_threads: int | None = 2,
    evaluate: bool = True,
    progress: bool = True,
) -> PretrainResult:
    """Contrastively pretrain the tiny CLIP on freshly rendered (scene, caption) pairs.

    Each step renders new scenes (scene stream ``seed``), tokenises their image-level
    captions and minimises ``open_clip.ClipLoss`` with AdamW and a warmup + cosine
    schedule. Seeds fix the initialisation and the data, so a run is deterministic for
    a given thread count.

    Two phases share one schedule:

    1. Crops (the first ``1 - full_res_fraction`` of the steps): ``crop_size`` px scenes
       whose objects have their full-resolution pixel size, each placed at a random
       window of the position table (:func:`_encode_image_windows`). Patch tokens then
       see objects at the scale of full-size scenes (a 20-56 px object spans 2.5-7
       patches, enough for a ViT to learn shapes quickly) for a quarter of the cost.
    2. Full resolution (the rest): whole scenes at the model's input size, so pooling
       and positions adapt to full images with 1-4 objects.

    Batches are groups of ``group_size`` confusable scenes (same colours with other
    shapes, same shapes with other colours, swapped bindings): random scenes are told
    apart by colour alone, and the CLIP would never learn shape.

    Args:
        output_dir: folder that receives ``open_clip_config.json`` and
            ``open_clip_model.safetensors`` (loadable with ``local-dir:``).
        steps: optimiser steps, both phases together.
        batch_size: scenes per crop-phase step (also the number of in-batch negatives).
        seed: seeds torch and the scene stream.
        model_cfg: open_clip model config (default :data:`TINY_CLIP_CONFIG`).
        crop_size: crop side in px (a multiple of the patch size); ``None`` trains on
            full-resolution scenes only.
        full_res_fraction: share of the steps (the last ones) on full-resolution scenes.
        full_res_batch_size: scenes per full-resolution step.
        group_size: scenes per group of confusable scenes; 1 gives independent scenes.
        single_object_fraction: probability that a group holds single-object scenes.
        single_object_warmup: share of the steps (the first ones) that use only
            single-object scenes, a curriculum: one object per caption first, so shapes
            are learnt before compositions.
        bf16: bfloat16 autocast for the forward pass (fast on CPUs with AVX512-BF16).
        num_threads: ``torch.set_num_threads`` value (``None`` leaves it alone).
        evaluate: run :func:`evaluate_tiny_clip` at the end and store the metrics.

    Returns:
        A :class:`PretrainResult` (the trained model, timings, final loss, metrics).
    """
    from tqdm.auto import tqdm

    model_cfg = copy.deepcopy(TINY_CLIP_CONFIG if model_cfg is None else model_cfg)
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    torch.manual_seed(seed)
    model = build_tiny_clip(model_cfg)
    model.train()
    tokenizer = open_clip.get_tokenizer(TINY_CLIP_NAME, context_length=model.context_length)
    full_size = model.visual.image_size[0]
    patch = model.visual.patch_size[0]
    if crop_size is not None and (crop_size % patch or crop_size > full_size):
        raise ValueError(f"crop_size must be a multiple of {patch} and <= {full_size}")
    crop_steps = 0 if crop_size is None else steps - int(round(full_res_fraction * steps))
    loss_fn = open_clip.ClipLoss()
    optimizer = torch.optim.AdamW(
        _param_groups(model, weight_decay), lr=lr, betas=(0.9, 0.98), eps=1e-6
    )
    warmup = warmup_steps if warmup_steps is not None else max(1, steps // 20)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _cosine_with_warmup(warmup, steps))
    # Crops keep objects at their full-resolution pixel size.
    crop_object_size = tuple(
        bound * full_size / (crop_size or full_size) for bound in scenes.OBJECT_SIZE_RANGE
    )

    start = time.perf_counter()
    losses = []
    bar = tqdm(range(steps), desc="tiny CLIP", disable=not progress)
    for step in bar:
        cropped = step < crop_steps
        single_fraction = 1.0 if step < single_object_warmup * steps else single_object_fraction
        if cropped:
            images, captions = _training_batch(
                seed, step, batch_size, crop_size, group_size=group_size,
                single_object_fraction=single_fraction,
                max_objects=3, object_size=crop_object_size,
            )
            max_offset = (full_size - crop_size) // patch
            offsets = torch.from_numpy(
                np.random.default_rng([seed, step, 1]).integers(0, max_offset + 1, (batch_size, 2))
            )
        else:
            images, captions = _training_batch(
                seed, step, full_res_batch_size, full_size, group_size=group_size,
                single_object_fraction=single_fraction,
            )
        pixels = images_to_tensor(images, model, image_size=images.shape[1])
        tokens = tokenizer(captions)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            if cropped:
                image_features = F.normalize(_encode_image_windows(model, pixels, offsets), dim=-1)
            else:
                image_features = model.encode_image(pixels, normalize=True)
            text_features = model.encode_text(tokens, normalize=True)
            logit_scale = model.logit_scale.exp()
            loss = loss_fn(image_features.float(), text_features.float(), logit_scale)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        with torch.no_grad():
            # CLIP's cap on the temperature: logit scale <= 100.
            model.logit_scale.clamp_(0, math.log(100))
        losses.append(loss.item())
        if step % 10 == 0 or step == steps - 1:
            bar.set_postfix(loss=f"{np.mean(losses[-10:]):.3f}", scale=f"{logit_scale.item():.1f}")
    seconds = time.perf_counter() - start
    model.eval()

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
        "num_threads": num_threads,
    }
    result = PretrainResult(
        model=model,
        output_dir=Path(output_dir),
        seconds=seconds,
        seconds_per_step=seconds / max(1, steps),
        final_loss=float(np.mean(losses[-20:])) if losses else float("nan"),
    )
    if evaluate:
        result.metrics = evaluate_tiny_clip(model, tokenizer)
    save_open_clip_folder(model, model_cfg, output_dir, extra={"recipe": recipe, **result.summary()})
    return result


def main(argv: list[str] | None = None) -> None:
    """``python -m onepass_ovs.toy.clip --output DIR --steps N``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", required=True, help="folder for the open_clip checkpoint")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--crop-size", type=int, default=64, help="0 = full resolution only")
    parser.add_argument("--full-res-fraction", type=float, default=0.1)
    parser.add_argument("--full-res-batch-size", type=int, default=64)
    parser.add_argument("--pool", choices=("tok", "avg"), default=None)
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--single-object-fraction", type=float, default=0.25)
    parser.add_argument("--single-object-warmup", type=float, default=0.3)
    parser.add_argument("--fp32", action="store_true", help="no bfloat16 autocast")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-eval", action="store_true")
    args = parser.parse_args(argv)

    model_cfg = copy.deepcopy(TINY_CLIP_CONFIG)
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
        num_threads=args.threads,
        evaluate=not args.no_eval,
    )
    print(json.dumps({"output_dir": str(result.output_dir), **result.summary()}, indent=2))


if __name__ == "__main__":
    main()
