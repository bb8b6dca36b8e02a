"""A generic, model-agnostic training loop with exact resume.

The engine knows nothing of segmentation. A training stage supplies a model, a
map-style dataset, a ``loss_fn(model, batch) -> {"loss": tensor, ...}`` and a
:class:`TrainConfig`; :class:`Trainer` does the rest: AdamW/SGD with per-module lr
multipliers and no decay on norms/biases/embeddings (:func:`param_groups`), warmup +
poly/cosine schedule (:func:`lr_factor`), gradient accumulation, gradient-norm clipping,
bf16 autocast, DDP under torchrun, a tqdm bar and a JSONL log on rank 0, and atomic
pickle-free checkpoints.

Determinism contract (why resume is exact)
------------------------------------------
Everything the run consumes is a pure function of ``(config.seed, step)``:

* data order: epoch ``e`` is ``randperm(len(dataset))`` seeded by ``(seed, e)``, padded
  and sharded across ranks like ``DistributedSampler``; the per-rank streams of epochs
  are concatenated, and optimizer step ``k`` reads positions
  ``[k * B * A, (k + 1) * B * A)`` of this rank's stream (``B`` = batch_size,
  ``A`` = grad_accum_steps). Batches may straddle an epoch boundary.
* augmentation: ``sample_transform(sample, generator)`` gets a fresh ``torch.Generator``
  seeded by ``(seed, epoch, index)``, so it does not depend on workers or on resume.
* everything else random in the training process (dropout, ...) draws from the global
  RNGs, whose states (torch CPU, CUDA, numpy, python; one set per rank) are saved in
  every checkpoint and restored on resume.

So a checkpoint only needs the step, the model, the optimizer and the RNG states; a run
resumed from step ``k`` repeats the uninterrupted run bit for bit on CPU (on GPU, up to
non-deterministic kernels).

Output layout (``config.output_dir``)::

    config.json                  the TrainConfig of the run
    train_log.jsonl              one JSON object per logged step (rank 0)
    checkpoints/step_00001000/   one folder per checkpoint, renamed into place atomically
        model.safetensors        model state dict (frozen params optional)
        optimizer.safetensors    every tensor of the optimizer state, flattened
        rng.safetensors          RNG state tensors of every rank
        trainer_state.json       step, config, optimizer scalars and param groups,
                                 python/numpy RNG scalars

Launch: ``python train.py`` (one process, CUDA if available) or
``torchrun --nproc_per_node N train.py`` (DDP; NCCL on GPUs, Gloo on CPU).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import random
import re
import shutil
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from .distributed import (
    DistContext,
    all_gather_object,
    all_reduce_max,
    barrier,
    init_distributed,
    unwrap,
)

__all__ = [
    "DEFAULT_NO_DECAY",
    "SampleOrder",
    "TrainConfig",
    "Trainer",
    "derive_seed",
    "find_latest_checkpoint",
    "list_checkpoints",
    "load_model_weights",
    "lr_factor",
    "param_groups",
    "seed_everything",
]

logger = logging.getLogger(__name__)

#: Name fragments whose parameters get no weight decay (see :func:`param_groups`).
DEFAULT_NO_DECAY: tuple[str, ...] = ("norm", "bias", "embedding", "embed", "pos")

CHECKPOINT_FORMAT = "onepass_ovs.train_checkpoint/1"
_CHECKPOINT_DIR = "checkpoints"
_CHECKPOINT_NAME = re.compile(r"^step_(\d{8,})$")
_CHECKPOINT_FILES = (
    "model.safetensors",
    "optimizer.safetensors",
    "rng.safetensors",
    "trainer_state.json",
)
_LOG_NAME = "train_log.jsonl"
_CONFIG_NAME = "config.json"
# Config fields that do not change the trajectory: changing them on resume is routine.
_BOOKKEEPING_FIELDS = frozenset(
    {"log_every", "checkpoint_every", "keep_checkpoints", "num_workers", "output_dir",
     "device", "progress_bar"}
)  # fmt: skip

_NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.LocalResponseNorm,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)
_EMBEDDING_TYPES: tuple[type[nn.Module], ...] = (nn.Embedding, nn.EmbeddingBag)


# --------------------------------------------------------------------------------------
# Configuration and schedule
# --------------------------------------------------------------------------------------


@dataclass
class TrainConfig:
    """Hyperparameters of one training run; JSON-serialisable (see :meth:`to_dict`).

    Batch arithmetic: one optimizer step consumes ``batch_size * grad_accum_steps``
    samples on each of ``world_size`` processes, i.e. a global batch of
    ``batch_size * grad_accum_steps * world_size``.
    """

    steps: int = 1000
    """Number of optimizer steps; also the horizon of the lr schedule."""
    batch_size: int = 8
    """Samples per process per micro-step (one forward/backward)."""
    lr: float = 1e-4
    """Base learning rate (before per-group multipliers and the schedule)."""
    weight_decay: float = 1e-4
    optimizer: str = "adamw"
    """"adamw" (decoupled decay) or "sgd" (L2 decay, ``momentum``)."""
    betas: tuple[float, float] = (0.9, 0.999)
    momentum: float = 0.9
    eps: float = 1e-8
    lr_schedule: str = "poly"
    """"poly" ``(1 - t/T) ** poly_power``, "cosine" or "constant"; see :func:`lr_factor`."""
    poly_power: float = 0.9
    min_lr_ratio: float = 0.0
    """Floor of the schedule as a fraction of the base lr (poly and cosine)."""
    warmup_steps: int = 0
    """Linear warmup multiplied onto the schedule: factor ``(step + 1) / warmup_steps``."""
    lr_multipliers: dict[str, float] = field(default_factory=dict)
    """Module-name prefix -> lr multiplier, e.g. ``{"backbone": 0.1}``; longest prefix wins."""
    no_decay: tuple[str, ...] = DEFAULT_NO_DECAY
    """Name fragments exempt from weight decay, on top of norm/embedding modules and biases."""
    grad_clip_norm: float | None = None
    """Clip the global gradient L2 norm to this value (the paper's 0.01); None = off."""
    amp: str = "none"
    """"none" or "bf16" (``torch.autocast`` around ``loss_fn``; no grad scaler needed)."""
    grad_accum_steps: int = 1
    log_every: int = 20
    checkpoint_every: int = 1000
    """Save every this many steps (and always after the last step); 0 = last step only."""
    keep_checkpoints: int | None = 3
    """Keep only the newest this many checkpoints; None keeps all."""
    save_frozen_params: bool = True
    """False leaves ``requires_grad=False`` parameters (e.g. a frozen CLIP) out of
    checkpoints; the caller must then rebuild them identically before resuming."""
    seed: int = 0
    num_workers: int = 2
    output_dir: str = "runs/train"
    device: str | None = None
    """None = ``cuda:<LOCAL_RANK>`` when available, else CPU."""
    find_unused_parameters: bool = False
    """Passed to DDP; needed when some trainable parameters get no gradient in a step."""
    progress_bar: bool = True

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)  # JSON round-trips tuples as lists
        self.no_decay = tuple(self.no_decay)
        self.lr_multipliers = dict(self.lr_multipliers)
        for name in ("steps", "batch_size", "grad_accum_steps", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.checkpoint_every < 0 or self.warmup_steps < 0 or self.num_workers < 0:
            raise ValueError("checkpoint_every, warmup_steps and num_workers must be >= 0")
        if self.keep_checkpoints is not None and self.keep_checkpoints < 1:
            raise ValueError("keep_checkpoints must be >= 1 or None")
        if self.optimizer not in ("adamw", "sgd"):
            raise ValueError(f"optimizer must be 'adamw' or 'sgd', got {self.optimizer!r}")
        if self.lr_schedule not in ("poly", "cosine", "constant"):
            raise ValueError(f"unknown lr_schedule {self.lr_schedule!r}")
        if self.amp not in ("none", "bf16"):
            raise ValueError(f"amp must be 'none' or 'bf16', got {self.amp!r}")
        if self.grad_clip_norm is not None and self.grad_clip_norm <= 0:
            raise ValueError("grad_clip_norm must be > 0 or None")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-compatible dict (tuples become lists)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> TrainConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise (they are usually typos)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise TypeError(f"unknown TrainConfig fields: {unknown}")
        return cls(**values)


def lr_factor(step: int, config: TrainConfig) -> float:
    """Multiplier of each group's base lr for the update from ``step`` to ``step + 1``.

    ``step`` runs over ``[0, config.steps)``; with ``t = step / steps``:
    poly ``(1 - t) ** poly_power``, cosine ``(1 + cos(pi t)) / 2``, constant 1, then
    ``min_lr_ratio + (1 - min_lr_ratio) * f``, times ``(step + 1) / warmup_steps`` while
    ``step < warmup_steps`` (the warmup multiplies the schedule, it does not delay it).
    """
    progress = min(max(step / config.steps, 0.0), 1.0)
    if config.lr_schedule == "poly":
        factor = (1.0 - progress) ** config.poly_power
    elif config.lr_schedule == "cosine":
        factor = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        factor = 1.0
    if config.lr_schedule != "constant":
        factor = config.min_lr_ratio + (1.0 - config.min_lr_ratio) * factor
    if step < config.warmup_steps:
        factor *= (step + 1) / config.warmup_steps
    return factor


# --------------------------------------------------------------------------------------
# Parameter groups
# --------------------------------------------------------------------------------------


def _fragment_matches(name: str, fragments: Sequence[str]) -> bool:
    # Whole-word-ish matching: a plain substring test would exempt "ln_post" or
    # "decompose" through "pos"; numbered/plural forms ("norm1", "embeddings") still hit.
    patterns = [re.compile(rf".*{re.escape(f)}(?:s|\d*)") for f in fragments]
    for component in name.split("."):
        for word in {component, *component.split("_")}:
            if any(pattern.fullmatch(word) for pattern in patterns):
                return True
    return False


def param_groups(
    model: nn.Module,
    base_lr: float,
    weight_decay: float,
    *,
    lr_multipliers: Mapping[str, float] | None = None,
    no_decay: Sequence[str] = DEFAULT_NO_DECAY,
) -> list[dict[str, Any]]:
    """Optimizer parameter groups: per-prefix lr multipliers, no decay where it hurts.

    Only trainable parameters (``requires_grad``) are included. A parameter gets no
    weight decay when its owning module is a normalisation or embedding layer, when its
    leaf name is ``bias``, or when a fragment of ``no_decay`` ends one of its dotted name
    components or ``_``-separated words, optionally followed by digits or an "s":
    "norm" matches ``norm1.weight`` and ``layernorm.weight``, "pos" matches
    ``query_pos`` and ``pos_embed`` but not ``ln_post`` or ``position``, "embedding"
    matches ``class_embedding``. ``lr_multipliers`` maps module-name prefixes
    (``"backbone"`` matches ``backbone.*``) to multipliers; the longest matching prefix
    wins, default 1.

    Returns one group per (multiplier, decay) pair, each a dict with ``params``,
    ``param_names``, ``lr`` (= base_lr * multiplier), ``base_lr`` (the same, which the
    trainer's schedule scales) and ``weight_decay``. Raises ValueError when a multiplier
    prefix names no parameter at all (a typo would otherwise train at the wrong lr).
    """
    lr_multipliers = dict(lr_multipliers or {})
    owner_is_exempt: dict[str, bool] = {}
    for module_name, module in model.named_modules():
        exempt = isinstance(module, _NORM_TYPES + _EMBEDDING_TYPES)
        for param_name, _ in module.named_parameters(prefix=module_name, recurse=False):
            owner_is_exempt[param_name] = exempt

    def prefix_of(name: str) -> str | None:
        matches = [p for p in lr_multipliers if name == p or name.startswith(p + ".")]
        return max(matches, key=len) if matches else None

    all_names = [name for name, _ in model.named_parameters()]
    unused = [p for p in lr_multipliers if not any(prefix_of(n) == p for n in all_names)]
    if unused:
        raise ValueError(f"lr_multipliers prefixes match no parameter: {unused}")

    groups: dict[tuple[float, bool], dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        prefix = prefix_of(name)
        multiplier = float(lr_multipliers[prefix]) if prefix is not None else 1.0
        decay = not (
            owner_is_exempt.get(name, False)
            or name.rsplit(".", 1)[-1] == "bias"
            or _fragment_matches(name, no_decay)
        )
        group = groups.setdefault(
            (multiplier, decay),
            {
                "params": [],
                "param_names": [],
                "lr": base_lr * multiplier,
                "base_lr": base_lr * multiplier,
                "lr_multiplier": multiplier,
                "weight_decay": weight_decay if decay else 0.0,
            },
        )
        group["params"].append(param)
        group["param_names"].append(name)
    return list(groups.values())


# Trainer's keyword argument of the same name shadows the function inside __init__.
_build_param_groups = param_groups


# --------------------------------------------------------------------------------------
# Seeds and data order
# --------------------------------------------------------------------------------------


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed that is a stable function of ``parts`` (unlike ``hash()``)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and all GPUs), numpy and python ``random``.

    Call it before building the model so that its initialisation is reproducible;
    :meth:`Trainer.fit` reseeds per rank on a fresh start anyway.
    """
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


class SampleOrder:
    """The deterministic per-rank stream of ``(epoch, index)`` pairs.

    Epoch ``e`` is a permutation of ``range(dataset_len)`` seeded by ``(seed, e)``,
    padded by wrapping to a multiple of ``world_size`` and dealt round-robin: rank ``r``
    gets ``padded[r::world_size]`` (``per_rank`` = ceil(len / world) items). The stream
    is epoch 0's shard, then epoch 1's, and so on, forever.
    """

    def __init__(self, dataset_len: int, *, seed: int, rank: int = 0, world_size: int = 1):
        if dataset_len < 1:
            raise ValueError("the dataset is empty")
        self.dataset_len = dataset_len
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.per_rank = math.ceil(dataset_len / world_size)

    def epoch_shard(self, epoch: int) -> list[int]:
        """Dataset indices this rank visits in ``epoch``, in order (length ``per_rank``)."""
        generator = torch.Generator().manual_seed(derive_seed(self.seed, epoch, "order"))
        order = torch.randperm(self.dataset_len, generator=generator)
        total = self.per_rank * self.world_size
        if total > self.dataset_len:
            order = order.repeat(math.ceil(total / self.dataset_len))[:total]
        return order[self.rank : total : self.world_size].tolist()

    def stream(self, start: int = 0) -> Iterator[tuple[int, int]]:
        """``(epoch, index)`` pairs from stream position ``start`` on, forever."""
        epoch, offset = divmod(start, self.per_rank)
        while True:
            for index in self.epoch_shard(epoch)[offset:]:
                yield epoch, index
            epoch, offset = epoch + 1, 0


class _StepBatchSampler(Sampler[list[tuple[int, int]]]):
    """``num_batches`` consecutive batches of ``batch_size`` keys from ``order.stream``."""

    def __init__(self, order: SampleOrder, start: int, batch_size: int, num_batches: int):
        self.order = order
        self.start = start
        self.batch_size = batch_size
        self.num_batches = num_batches

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        stream = self.order.stream(self.start)
        for _ in range(self.num_batches):
            yield [next(stream) for _ in range(self.batch_size)]


class _KeyedDataset(Dataset):
    """Maps an ``(epoch, index)`` key to ``sample_transform(dataset[index], generator)``."""

    def __init__(self, dataset: Any, sample_transform: Callable | None, seed: int):
        self.dataset = dataset
        self.sample_transform = sample_transform
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        epoch, index = key
        sample = self.dataset[index]
        if self.sample_transform is None:
            return sample
        generator = torch.Generator().manual_seed(derive_seed(self.seed, epoch, index))
        return self.sample_transform(sample, generator)


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return type(batch)({k: _to_device(v, device) for k, v in batch.items()})
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(_to_device(v, device) for v in batch))
    if isinstance(batch, list | tuple):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


# --------------------------------------------------------------------------------------
# Pickle-free serialisation helpers
# --------------------------------------------------------------------------------------


def _split_tensors(obj: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """JSON skeleton of ``obj`` with every tensor moved to ``tensors[<path>]``.

    The skeleton holds ``{"__tensor__": <path>}`` where a tensor was. Dict keys become
    strings; tuples become lists (callers restore what they need).
    """
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj.detach().to("cpu").contiguous()
        return {"__tensor__": prefix}
    if isinstance(obj, Mapping):
        return {str(k): _split_tensors(v, f"{prefix}.{k}", tensors) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_split_tensors(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    raise TypeError(f"cannot checkpoint a {type(obj).__name__} at {prefix!r} without pickle")


def _join_tensors(obj: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    """Inverse of :func:`_split_tensors`."""
    if isinstance(obj, dict):
        if set(obj) == {"__tensor__"}:
            return tensors[obj["__tensor__"]]
        return {k: _join_tensors(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_join_tensors(v, tensors) for v in obj]
    return obj


def _unshare(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous tensors with no two sharing storage, as safetensors requires.

    Tied weights are stored twice; loading copies both into the one shared parameter.
    """
    seen: set[int] = set()
    out = {}
    for name, tensor in tensors.items():
        tensor = tensor.detach().contiguous()
        if tensor.numel() > 0:
            pointer = tensor.untyped_storage().data_ptr()
            if pointer in seen:
                tensor = tensor.clone()
            seen.add(tensor.untyped_storage().data_ptr())
        out[name] = tensor
    return out


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    # Directory fsync makes a rename durable; not every platform/filesystem allows it.
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_json_atomic(path: Path, payload: Any) -> None:
    temp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(temp, "w") as handle:
        json.dump(payload, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temp, path)
    _fsync_dir(path.parent)


# --------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------


def _is_complete(path: Path) -> bool:
    if not _CHECKPOINT_NAME.match(path.name) or not path.is_dir():
        return False
    if not all((path / name).is_file() for name in _CHECKPOINT_FILES):
        return False
    try:
        state = json.loads((path / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False
    return state.get("format") == CHECKPOINT_FORMAT and state.get("step") == int(
        _CHECKPOINT_NAME.match(path.name).group(1)
    )


def list_checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``output_dir`` as ``(step, path)``, oldest first.

    Temporary folders of an interrupted write never qualify: they are hidden (``.``
    prefix) until the final rename.
    """
    root = Path(output_dir) / _CHECKPOINT_DIR
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        if _is_complete(path):
            found.append((int(_CHECKPOINT_NAME.match(path.name).group(1)), path))
    return sorted(found)


def find_latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint folder under ``output_dir``, or None."""
    checkpoints = list_checkpoints(output_dir)
    return checkpoints[-1][1] if checkpoints else None


def load_model_weights(model: nn.Module, checkpoint: str | os.PathLike) -> nn.Module:
    """Load a checkpoint's model weights (folder or its ``model.safetensors``) into ``model``.

    Strict, except that parameters left out by ``save_frozen_params=False`` may be
    missing (they keep the values ``model`` has). Returns ``model``.
    """
    path = Path(checkpoint)
    if path.is_dir():
        path = path / "model.safetensors"
    target = unwrap(model)
    state = load_file(path, device="cpu")
    missing, unexpected = target.load_state_dict(state, strict=False)
    frozen = {name for name, p in target.named_parameters() if not p.requires_grad}
    missing = [name for name in missing if name not in frozen]
    if missing or unexpected:
        raise RuntimeError(
            f"checkpoint {path} does not match the model: missing {missing}, "
            f"unexpected {unexpected}"
        )
    return model


def _capture_rng(device: torch.device) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if device.type == "cuda":
        tensors["cuda"] = torch.cuda.get_rng_state(device)
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    tensors["numpy_keys"] = torch.from_numpy(keys.astype(np.int64))
    version, python_state, gauss_next = random.getstate()
    scalars = {
        "numpy": [kind, int(position), int(has_gauss), float(cached_gaussian)],
        "python": [version, list(python_state), gauss_next],
    }
    return tensors, scalars


def _restore_rng(
    tensors: Mapping[str, torch.Tensor], scalars: Mapping[str, Any], device: torch.device
) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    if device.type == "cuda" and "cuda" in tensors:
        torch.cuda.set_rng_state(tensors["cuda"], device)
    kind, position, has_gauss, cached_gaussian = scalars["numpy"]
    keys = tensors["numpy_keys"].numpy().astype(np.uint32)
    np.random.set_state((kind, keys, position, has_gauss, cached_gaussian))
    version, python_state, gauss_next = scalars["python"]
    random.setstate((version, tuple(python_state), gauss_next))


# --------------------------------------------------------------------------------------
# Trainer
# --------------------------------------------------------------------------------------

LossFn = Callable[[nn.Module, Any], Mapping[str, torch.Tensor | float]]


class Trainer:
    """Runs ``config.steps`` optimizer steps of ``loss_fn`` over ``dataset``.

    Args:
        model: the module to train; moved to the training device. Under torchrun it is
            wrapped in DDP; ``loss_fn`` receives the wrapper (call it for forward, use
            :func:`~onepass_ovs.training.distributed.unwrap` for attributes).
        loss_fn: ``loss_fn(model, batch) -> {"loss": scalar tensor, **other_terms}``.
            ``"loss"`` is back-propagated; every term (tensor or float) is logged, averaged
            over micro-steps, steps of the log interval and ranks. Compute per-sample means
            so that accumulation and DDP averaging equal a larger batch.
        dataset: map-style (``__len__``, ``__getitem__(int)``).
        config: the run's :class:`TrainConfig`.
        collate_fn: merges a list of samples into a batch (default ``default_collate``);
            the batch's tensors (in dicts/lists/tuples) are moved to the device.
        param_groups: optimizer groups to use instead of
            ``param_groups(model, config.lr, config.weight_decay, ...)``. A group's
            ``base_lr`` (default its ``lr``, default ``config.lr``) is what the schedule
            scales.
        sample_transform: ``f(sample, generator) -> sample``, run in the loader workers.
            Draw every random number from ``generator`` (seeded by seed, epoch, index)
            for augmentation that survives resume and any ``num_workers``.
        on_checkpoint: ``f(path, step)`` called on rank 0 after a checkpoint is in place.
        on_log: ``f(entry)`` called on rank 0 with each dict written to the JSONL log.

    ``fit`` puts the model in train mode (``model.train()``). Submodules that must stay
    in eval mode while training (a frozen network with BatchNorm, a distillation
    teacher) have to enforce that themselves, e.g. by overriding ``train()``.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        dataset: Any,
        config: TrainConfig,
        *,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        param_groups: Sequence[dict[str, Any]] | None = None,
        sample_transform: Callable[[Any, torch.Generator], Any] | None = None,
        on_checkpoint: Callable[[Path, int], None] | None = None,
        on_log: Callable[[dict[str, Any]], None] | None = None,
    ):
        if isinstance(dataset, torch.utils.data.IterableDataset):
            raise TypeError("Trainer needs a map-style dataset; its order is derived from the step")
        self.config = config
        self.loss_fn = loss_fn
        self.dataset = dataset
        self.collate_fn = collate_fn if collate_fn is not None else default_collate
        self.sample_transform = sample_transform
        self.on_checkpoint = on_checkpoint
        self.on_log = on_log
        self.dist: DistContext = init_distributed(config.device)
        self.device = self.dist.device
        self.output_dir = Path(config.output_dir)
        self.step = 0

        model = unwrap(model)
        model.to(self.device)
        self.model = model
        groups = (
            [dict(g) for g in param_groups]
            if param_groups is not None
            else _build_param_groups(
                model,
                config.lr,
                config.weight_decay,
                lr_multipliers=config.lr_multipliers,
                no_decay=config.no_decay,
            )
        )
        if not groups or not any(len(list(g["params"])) for g in groups):
            raise ValueError("the model has no trainable parameters")
        for group in groups:
            group.setdefault("base_lr", group.get("lr", config.lr))
        self.optimizer = self._build_optimizer(groups)
        self.trainable = [p for g in self.optimizer.param_groups for p in g["params"]]

        self.wrapped: nn.Module = model
        if self.dist.world_size > 1:
            self.wrapped = nn.parallel.DistributedDataParallel(
                model,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=config.find_unused_parameters,
            )

    # ---------------------------------------------------------------- construction

    def _build_optimizer(self, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
        config = self.config
        if config.optimizer == "adamw":
            return torch.optim.AdamW(
                groups,
                lr=config.lr,
                betas=config.betas,
                eps=config.eps,
                weight_decay=config.weight_decay,
            )
        return torch.optim.SGD(
            groups, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
        )

    def _make_loader(self, start_step: int) -> DataLoader:
        config = self.config
        order = SampleOrder(
            len(self.dataset),
            seed=config.seed,
            rank=self.dist.rank,
            world_size=self.dist.world_size,
        )
        micro_steps = config.grad_accum_steps
        batch_sampler = _StepBatchSampler(
            order,
            start=start_step * config.batch_size * micro_steps,
            batch_size=config.batch_size,
            num_batches=(config.steps - start_step) * micro_steps,
        )
        return DataLoader(
            _KeyedDataset(self.dataset, self.sample_transform, config.seed),
            batch_sampler=batch_sampler,
            num_workers=config.num_workers,
            collate_fn=self.collate_fn,
            pin_memory=self.device.type == "cuda",
            # Without its own generator the loader draws its worker base seed from the
            # global torch RNG, which would shift dropout masks after a resume.
            generator=torch.Generator().manual_seed(
                derive_seed(config.seed, self.dist.rank, start_step, "loader")
            ),
        )

    # ---------------------------------------------------------------- public API

    def fit(self, resume: bool | str | os.PathLike = False) -> nn.Module:
        """Train up to ``config.steps`` and return the (unwrapped) model.

        resume: False starts fresh (refusing an ``output_dir`` that holds checkpoints
        already); "auto" (or True) continues from the newest complete checkpoint in
        ``output_dir`` and starts fresh when there is none, so the same command restarts
        a preempted job; a path continues from that checkpoint folder.
        """
        config = self.config
        checkpoint = self._resolve_resume(resume)
        if checkpoint is None:
            self.step = 0
            # Per-rank streams: DDP syncs the weights, dropout masks should differ.
            seed_everything(derive_seed(config.seed, self.dist.rank, "process"))
            if self.dist.is_main:
                self.output_dir.mkdir(parents=True, exist_ok=True)
                (self.output_dir / _LOG_NAME).unlink(missing_ok=True)
        else:
            self._load_checkpoint(checkpoint)
            if self.dist.is_main:
                self._truncate_log(self.step)
        if self.dist.is_main:
            _write_json_atomic(self.output_dir / _CONFIG_NAME, config.to_dict())
        barrier()
        if self.step >= config.steps:
            return self.model
        self._train_loop()
        return self.model

    # ---------------------------------------------------------------- the loop

    def _train_loop(self) -> None:
        config = self.config
        accum = config.grad_accum_steps
        is_ddp = isinstance(self.wrapped, nn.parallel.DistributedDataParallel)
        autocast = torch.autocast(
            device_type=self.device.type, dtype=torch.bfloat16, enabled=config.amp == "bf16"
        )
        micro_batches = iter(self._make_loader(self.step))
        window = _LogWindow(self.device)
        progress = None
        if self.dist.is_main and config.progress_bar:
            from tqdm.auto import tqdm

            progress = tqdm(total=config.steps, initial=self.step, desc="train", dynamic_ncols=True)
        self.wrapped.train()
        try:
            while self.step < config.steps:
                factor = lr_factor(self.step, config)
                for group in self.optimizer.param_groups:
                    group["lr"] = group["base_lr"] * factor
                self.optimizer.zero_grad(set_to_none=True)
                for micro in range(accum):
                    batch = _to_device(next(micro_batches), self.device)
                    # Gradients are all-reduced once per optimizer step, on the last
                    # micro-step; earlier ones only accumulate locally.
                    skip_sync = is_ddp and micro < accum - 1
                    with self.wrapped.no_sync() if skip_sync else contextlib.nullcontext():
                        with autocast:
                            terms = self.loss_fn(self.wrapped, batch)
                        if "loss" not in terms:
                            raise KeyError("loss_fn must return a dict with a 'loss' entry")
                        (terms["loss"] / accum).backward()
                    window.add_micro(terms, 1.0 / accum)
                grad_norm = None
                if config.grad_clip_norm is not None:
                    grad_norm = torch.nn.utils.clip_grad_norm_(
                        self.trainable, config.grad_clip_norm
                    )
                self.optimizer.step()
                self.step += 1
                window.end_step(grad_norm)
                if progress is not None:
                    progress.update(1)
                final = self.step == config.steps
                if self.step % config.log_every == 0 or final:
                    entry = self._log(window, config.lr * factor)
                    if progress is not None:
                        progress.set_postfix(loss=f"{entry['loss']:.4g}", lr=f"{entry['lr']:.3g}")
                every = config.checkpoint_every
                if final or (every and self.step % every == 0):
                    window.check_finite(self.step)
                    self._save_checkpoint()
        finally:
            if progress is not None:
                progress.close()
            del micro_batches  # shut loader workers down now, not at garbage collection

    def _log(self, window: _LogWindow, lr: float) -> dict[str, Any]:
        local = window.flush()  # {term: (sum, count)}, rank-local
        merged: dict[str, list[float]] = {}
        for rank_terms in all_gather_object(local):
            for key, (total, count) in rank_terms.items():
                merged.setdefault(key, [0.0, 0])
                merged[key][0] += total
                merged[key][1] += count
        entry: dict[str, Any] = {"step": self.step}
        entry.update({key: total / count for key, (total, count) in sorted(merged.items())})
        entry["lr"] = lr
        entry["time"] = time.time()
        if not math.isfinite(entry.get("loss", 0.0)):
            raise FloatingPointError(f"non-finite loss {entry['loss']} by step {self.step}")
        if self.dist.is_main:
            with open(self.output_dir / _LOG_NAME, "a") as handle:
                handle.write(json.dumps(entry) + "\n")
            if self.on_log is not None:
                self.on_log(entry)
        return entry

    def _truncate_log(self, step: int) -> None:
        # Entries written after the checkpoint we resume from describe a trajectory
        # that is about to be replayed; drop them so the log stays one clean curve.
        path = self.output_dir / _LOG_NAME
        if not path.is_file():
            return
        kept = [
            line
            for line in path.read_text().splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= step
        ]
        temp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        temp.write_text("".join(line + "\n" for line in kept))
        os.replace(temp, path)

    # ---------------------------------------------------------------- checkpoints

    def _resolve_resume(self, resume: bool | str | os.PathLike) -> Path | None:
        existing = list_checkpoints(self.output_dir)
        if resume is False or resume is None:
            if existing:
                raise FileExistsError(
                    f"{self.output_dir} already holds checkpoints (newest: step "
                    f"{existing[-1][0]}); pass resume='auto' or use a new output_dir"
                )
            return None
        if resume is True or resume == "auto":
            return existing[-1][1] if existing else None
        path = Path(resume)
        if not _is_complete(path):
            raise FileNotFoundError(f"{path} is not a complete checkpoint folder")
        if existing and existing[-1][0] > int(_CHECKPOINT_NAME.match(path.name).group(1)):
            logger.warning(
                "resuming from %s although %s holds newer checkpoints; they will be "
                "overwritten as training reaches their steps",
                path,
                self.output_dir,
            )
        return path

    def _save_checkpoint(self) -> Path:
        """Write ``checkpoints/step_XXXXXXXX`` atomically (rank 0) and wait for it."""
        # Collective: every rank's RNG state goes into the one checkpoint.
        rng_by_rank = all_gather_object(_capture_rng(self.device))
        final_dir = self.output_dir / _CHECKPOINT_DIR / f"step_{self.step:08d}"
        if self.dist.is_main:
            self._write_checkpoint(final_dir, rng_by_rank)
            self._prune_checkpoints()
            if self.on_checkpoint is not None:
                self.on_checkpoint(final_dir, self.step)
        barrier()
        return final_dir

    def _write_checkpoint(self, final_dir: Path, rng_by_rank: list[tuple[dict, dict]]) -> None:
        root = final_dir.parent
        root.mkdir(parents=True, exist_ok=True)
        # Build the whole checkpoint in a hidden sibling folder, then rename it into
        # place: a kill at any point leaves either no step_X folder or a complete one.
        temp_dir = root / f".{final_dir.name}.tmp-{os.getpid()}"
        if temp_dir.exists():
            shutil.rmtree(temp_dir)
        temp_dir.mkdir()
        metadata = {"format": CHECKPOINT_FORMAT, "step": str(self.step)}

        model_state = self.model.state_dict()
        if not self.config.save_frozen_params:
            frozen = {n for n, p in self.model.named_parameters() if not p.requires_grad}
            model_state = {k: v for k, v in model_state.items() if k not in frozen}
        save_file(_unshare(model_state), temp_dir / "model.safetensors", metadata=metadata)

        optimizer_tensors: dict[str, torch.Tensor] = {}
        optimizer_skeleton = _split_tensors(
            self.optimizer.state_dict(), "optimizer", optimizer_tensors
        )
        save_file(
            _unshare(optimizer_tensors), temp_dir / "optimizer.safetensors", metadata=metadata
        )

        rng_tensors: dict[str, torch.Tensor] = {}
        rng_scalars: dict[str, Any] = {}
        for rank, (tensors, scalars) in enumerate(rng_by_rank):
            rng_tensors.update({f"rank{rank}.{k}": v.cpu() for k, v in tensors.items()})
            rng_scalars[f"rank{rank}"] = scalars
        save_file(_unshare(rng_tensors), temp_dir / "rng.safetensors", metadata=metadata)

        state = {
            "format": CHECKPOINT_FORMAT,
            "step": self.step,
            "world_size": self.dist.world_size,
            "config": self.config.to_dict(),
            "optimizer_class": type(self.optimizer).__name__,
            "optimizer": optimizer_skeleton,
            "rng": rng_scalars,
            "torch_version": torch.__version__,
            "time": time.time(),
        }
        with open(temp_dir / "trainer_state.json", "w") as handle:
            json.dump(state, handle)
        for name in _CHECKPOINT_FILES:
            _fsync_file(temp_dir / name)
        _fsync_dir(temp_dir)

        stale = None
        if final_dir.exists():  # same step saved by an abandoned run; replace it
            stale = root / f".{final_dir.name}.old-{os.getpid()}"
            os.replace(final_dir, stale)
        os.replace(temp_dir, final_dir)
        _fsync_dir(root)
        if stale is not None:
            shutil.rmtree(stale, ignore_errors=True)

    def _prune_checkpoints(self) -> None:
        keep = self.config.keep_checkpoints
        root = self.output_dir / _CHECKPOINT_DIR
        for path in root.iterdir():
            # Leftovers of interrupted writes (our own final rename has happened already).
            if path.name.startswith(".step_"):
                shutil.rmtree(path, ignore_errors=True)
        if keep is None:
            return
        # Never delete checkpoints ahead of the current step: they belong to another
        # trajectory, and the user decided about them when choosing what to resume.
        past = [path for step, path in list_checkpoints(self.output_dir) if step <= self.step]
        for path in past[:-keep]:
            shutil.rmtree(path, ignore_errors=True)

    def _load_checkpoint(self, path: Path) -> None:
        state = json.loads((path / "trainer_state.json").read_text())
        saved_config = state["config"]
        current = self.config.to_dict()
        changed = sorted(
            k for k in current if k not in _BOOKKEEPING_FIELDS and saved_config.get(k) != current[k]
        )
        if changed:
            logger.warning("resuming %s with changed config fields: %s", path, changed)
        if state["world_size"] != self.dist.world_size:
            logger.warning(
                "checkpoint written by %d processes, resumed by %d: data order and RNG "
                "streams will differ from an uninterrupted run",
                state["world_size"],
                self.dist.world_size,
            )

        load_model_weights(self.model, path)

        if state["optimizer_class"] != type(self.optimizer).__name__:
            raise ValueError(
                f"checkpoint optimizer is {state['optimizer_class']}, "
                f"this run uses {type(self.optimizer).__name__}"
            )
        optimizer_state = _join_tensors(
            state["optimizer"], load_file(path / "optimizer.safetensors", device="cpu")
        )
        optimizer_state["state"] = {int(k): v for k, v in optimizer_state["state"].items()}
        for saved, group in zip(
            optimizer_state["param_groups"], self.optimizer.param_groups, strict=False
        ):
            if "param_names" in saved and saved["param_names"] != group.get(
                "param_names", saved["param_names"]
            ):
                raise ValueError(
                    "the model's trainable parameters differ from the checkpoint's "
                    f"(group of {group['param_names'][:3]}...)"
                )
            for key, value in group.items():
                if isinstance(value, tuple) and isinstance(saved.get(key), list):
                    saved[key] = tuple(saved[key])  # e.g. AdamW betas
        self.optimizer.load_state_dict(optimizer_state)

        rank_key = f"rank{self.dist.rank}"
        rng_tensors = load_file(path / "rng.safetensors", device="cpu")
        if rank_key in state["rng"]:
            own = {
                k.split(".", 1)[1]: v
                for k, v in rng_tensors.items()
                if k.startswith(rank_key + ".")
            }
            _restore_rng(own, state["rng"][rank_key], self.device)
        else:
            seed_everything(derive_seed(self.config.seed, self.dist.rank, state["step"]))
        self.step = int(state["step"])
        logger.info("resumed from %s at step %d", path, self.step)


class _LogWindow:
    """Running sums of the loss terms since the last log, kept on the device.

    Reading a CUDA tensor forces a sync, so the values stay on the device until a log
    step; a non-finite flag is kept alongside so checkpoints can refuse to save NaNs.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self.current: dict[str, torch.Tensor] = {}
        self.nonfinite = torch.zeros((), dtype=torch.int32, device=device)

    def add_micro(self, terms: Mapping[str, torch.Tensor | float], weight: float) -> None:
        """Add one micro-step's terms, weighted by 1 / grad_accum_steps."""
        for key, value in terms.items():
            value = torch.as_tensor(value, device=self.device).detach().float().mean()
            self.current[key] = self.current.get(key, 0.0) + value * weight
        loss = torch.as_tensor(terms["loss"], device=self.device).detach()
        self.nonfinite |= (~torch.isfinite(loss)).any().to(torch.int32)

    def end_step(self, grad_norm: torch.Tensor | None) -> None:
        if grad_norm is not None:
            self.current["grad_norm"] = grad_norm.detach().float()
        for key, value in self.current.items():
            self.sums[key] = self.sums.get(key, 0.0) + value
            self.counts[key] = self.counts.get(key, 0) + 1
        self.current = {}

    def flush(self) -> dict[str, tuple[float, int]]:
        """``{term: (sum over steps, number of steps)}`` since the last flush."""
        out = {key: (float(value), self.counts[key]) for key, value in self.sums.items()}
        self.sums, self.counts = {}, {}
        return out

    def check_finite(self, step: int) -> None:
        """Raise on every rank if any rank saw a non-finite loss so far."""
        if int(all_reduce_max(self.nonfinite.clone())) > 0:
            raise FloatingPointError(
                f"non-finite loss before step {step}; not saving this checkpoint"
            )
