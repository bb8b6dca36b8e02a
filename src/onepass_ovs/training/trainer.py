"""A generic, model-agnostic training loop with exact resume.

The trainer knows nothing of segmentation. A training stage supplies a model, a
map-style dataset, a ``loss_fn(model, batch) -> {"loss": tensor, ...}`` and a
:class:`~onepass_ovs.training.config.TrainConfig`; :class:`Trainer` does the rest, from
the modules that own each part:

- :mod:`.optim`: AdamW/SGD with per-module lr multipliers and no decay on
  norms/biases/embeddings;
- :mod:`.schedule`: warmup + poly/cosine schedule (a ``LambdaLR``);
- :mod:`.sampling`: the data order and per-sample generators, a pure function of
  ``(seed, step)``;
- :mod:`.checkpoints`: atomic pickle-free checkpoints;

and here: gradient accumulation, gradient-norm clipping, bf16 autocast, DDP under
torchrun, a tqdm bar and a JSONL log on rank 0.

Why resume is exact
-------------------
Data order and augmentation depend only on ``(config.seed, step)`` (see
:mod:`.sampling`); everything else random in the training process (dropout, ...) draws
from the global RNGs, whose states (torch CPU, CUDA, numpy, python; one set per rank)
are saved in every checkpoint and restored on resume. So a checkpoint only needs the
step, the model, the optimizer and the RNG states; a run resumed from step ``k``
repeats the uninterrupted run bit for bit on CPU (on GPU, up to non-deterministic
kernels).

Output layout (``config.output_dir``)::

    config.json                  the TrainConfig of the run
    train_log.jsonl              one JSON object per logged step (rank 0)
    checkpoints/step_00001000/   see :mod:`.checkpoints`

Launch: ``python train.py`` (one process, CUDA if available) or
``torchrun --nproc_per_node N train.py`` (DDP; NCCL on GPUs, Gloo on CPU).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, default_collate

from . import checkpoints
from .checkpoints import CheckpointData, CheckpointError
from .config import BOOKKEEPING_FIELDS, TrainConfig
from .distributed import (
    DistContext,
    all_gather_object,
    all_reduce_max,
    barrier,
    init_distributed,
    unwrap,
)
from .optim import build_optimizer
from .optim import param_groups as build_param_groups
from .sampling import build_loader, derive_seed, raise_if_failed, seed_everything
from .schedule import build_lr_scheduler, lr_factor

__all__ = ["LossFn", "Trainer"]

logger = logging.getLogger(__name__)

LOG_NAME = "train_log.jsonl"
CONFIG_NAME = "config.json"

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
        config: the run's :class:`~onepass_ovs.training.config.TrainConfig`.
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
            else build_param_groups(
                model,
                config.lr,
                config.weight_decay,
                lr_multipliers=config.lr_multipliers,
                no_decay=config.no_decay,
            )
        )
        self.optimizer = build_optimizer(groups, config)
        self.trainable = [p for g in self.optimizer.param_groups for p in g["params"]]

        self.wrapped: nn.Module = model
        if self.dist.world_size > 1:
            self.wrapped = nn.parallel.DistributedDataParallel(
                model,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=config.find_unused_parameters,
            )

    # ---------------------------------------------------------------- public API

    def fit(self, resume: bool | str | os.PathLike = False) -> nn.Module:
        """Train up to ``config.steps`` and return the (unwrapped) model.

        resume: False starts fresh (refusing an ``output_dir`` that holds checkpoints
        already); "auto" (or True) continues from the newest good checkpoint in
        ``output_dir`` (a damaged newer one is named in a warning and skipped) and starts
        fresh when there is none, so the same command restarts a preempted job; a path
        continues from that checkpoint folder.
        """
        config = self.config
        checkpoint = self._resolve_resume(resume)
        if checkpoint is None:
            self.step = 0
            # Per-rank streams: DDP syncs the weights, dropout masks should differ.
            seed_everything(derive_seed(config.seed, self.dist.rank, "process"))
            if self.dist.is_main:
                self.output_dir.mkdir(parents=True, exist_ok=True)
                (self.output_dir / LOG_NAME).unlink(missing_ok=True)
        else:
            self._restore(checkpoint)
            if self.dist.is_main:
                self._truncate_log(self.step)
        if self.dist.is_main:
            checkpoints.write_json_atomic(self.output_dir / CONFIG_NAME, config.to_dict())
        barrier()
        if self.step >= config.steps:
            return self.model
        self._train_loop()
        return self.model

    # ---------------------------------------------------------------- the loop

    def _make_loader(self, start_step: int) -> DataLoader:
        return build_loader(
            self.dataset,
            self.config,
            start_step=start_step,
            rank=self.dist.rank,
            world_size=self.dist.world_size,
            collate_fn=self.collate_fn,
            sample_transform=self.sample_transform,
            pin_memory=self.device.type == "cuda",
        )

    def _train_loop(self) -> None:
        config = self.config
        accum = config.grad_accum_steps
        is_ddp = isinstance(self.wrapped, nn.parallel.DistributedDataParallel)
        autocast = torch.autocast(
            device_type=self.device.type, dtype=torch.bfloat16, enabled=config.amp == "bf16"
        )
        scheduler = build_lr_scheduler(self.optimizer, config, self.step)
        micro_batches = iter(self._make_loader(self.step))
        window = _LogWindow(self.device)
        progress = None
        if self.dist.is_main and config.progress_bar:
            from tqdm.auto import tqdm

            progress = tqdm(total=config.steps, initial=self.step, desc="train", dynamic_ncols=True)
        self.wrapped.train()
        try:
            while self.step < config.steps:
                lr = config.lr * lr_factor(self.step, config)
                self.optimizer.zero_grad(set_to_none=True)
                for micro in range(accum):
                    batch = _to_device(raise_if_failed(next(micro_batches)), self.device)
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
                scheduler.step()
                self.step += 1
                window.end_step(grad_norm)
                if progress is not None:
                    progress.update(1)
                final = self.step == config.steps
                if self.step % config.log_every == 0 or final:
                    entry = self._log(window, lr)
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
            with open(self.output_dir / LOG_NAME, "a") as handle:
                handle.write(json.dumps(entry) + "\n")
            if self.on_log is not None:
                self.on_log(entry)
        return entry

    def _truncate_log(self, step: int) -> None:
        # Entries written after the checkpoint we resume from describe a trajectory
        # that is about to be replayed; drop them so the log stays one clean curve.
        path = self.output_dir / LOG_NAME
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

    def _resolve_resume(self, resume: bool | str | os.PathLike) -> CheckpointData | None:
        """The checkpoint to continue from, read and verified, or None for a fresh start."""
        if resume is False or resume is None:
            existing = checkpoints.list_checkpoints(self.output_dir)
            if existing:
                raise FileExistsError(
                    f"{self.output_dir} already holds checkpoints (newest: step "
                    f"{existing[-1][0]}); pass resume='auto' or use a new output_dir"
                )
            return None
        if resume is True or resume == "auto":
            return self._newest_good_checkpoint()
        path = Path(resume)
        if not checkpoints.is_complete(path):
            raise FileNotFoundError(f"{path} is not a complete checkpoint folder")
        loaded = checkpoints.read_checkpoint(path)
        newest = checkpoints.list_checkpoints(self.output_dir)
        if newest and newest[-1][0] > loaded.step:
            logger.warning(
                "resuming from %s although %s holds newer checkpoints; they will be "
                "overwritten as training reaches their steps",
                path,
                self.output_dir,
            )
        return loaded

    def _newest_good_checkpoint(self) -> CheckpointData | None:
        """Newest checkpoint that reads back intact; damaged newer ones are named and
        skipped (they are replaced when training reaches their step again)."""
        folders = checkpoints.checkpoint_folders(self.output_dir)
        damaged: list[str] = []
        for _, path in reversed(folders):
            try:
                loaded = checkpoints.read_checkpoint(path)
            except CheckpointError as err:
                damaged.append(str(err))
                if self.dist.is_main:
                    logger.warning("skipping a damaged checkpoint: %s", err)
                continue
            if damaged and self.dist.is_main:
                logger.warning("resuming from the previous good checkpoint %s", path)
            return loaded
        if damaged:
            raise CheckpointError(
                f"no usable checkpoint in {self.output_dir / checkpoints.CHECKPOINT_DIR}: "
                + "; ".join(damaged)
                + ". Remove the damaged folders to start over."
            )
        return None

    def _save_checkpoint(self) -> Path:
        """Write ``checkpoints/step_XXXXXXXX`` atomically (rank 0) and wait for it."""
        # Collective: every rank's RNG state goes into the one checkpoint.
        rng_by_rank = all_gather_object(checkpoints.capture_rng(self.device))
        final_dir = self.output_dir / checkpoints.CHECKPOINT_DIR / f"step_{self.step:08d}"
        if self.dist.is_main:
            checkpoints.write_checkpoint(
                final_dir,
                step=self.step,
                model=self.model,
                optimizer=self.optimizer,
                rng_by_rank=rng_by_rank,
                config=self.config.to_dict(),
                world_size=self.dist.world_size,
                save_frozen_params=self.config.save_frozen_params,
            )
            checkpoints.prune_checkpoints(self.output_dir, self.config.keep_checkpoints, self.step)
            if self.on_checkpoint is not None:
                self.on_checkpoint(final_dir, self.step)
        barrier()
        return final_dir

    def _restore(self, checkpoint: CheckpointData) -> None:
        """Put model, optimizer, this rank's RNGs and the step back as saved."""
        path, state = checkpoint.path, checkpoint.state
        saved_config = state["config"]
        current = self.config.to_dict()
        changed = sorted(
            k for k in current if k not in BOOKKEEPING_FIELDS and saved_config.get(k) != current[k]
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

        checkpoints.load_model_state(self.model, checkpoint.model, path / "model.safetensors")

        if state["optimizer_class"] != type(self.optimizer).__name__:
            raise ValueError(
                f"checkpoint optimizer is {state['optimizer_class']}, "
                f"this run uses {type(self.optimizer).__name__}"
            )
        optimizer_state = checkpoint.optimizer_state_dict()
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
        if rank_key in state["rng"]:
            own = {
                k.split(".", 1)[1]: v
                for k, v in checkpoint.rng.items()
                if k.startswith(rank_key + ".")
            }
            checkpoints.restore_rng(own, state["rng"][rank_key], self.device)
        else:
            seed_everything(derive_seed(self.config.seed, self.dist.rank, state["step"]))
        self.step = int(state["step"])
        logger.info("resumed from %s at step %d", path, self.step)


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
