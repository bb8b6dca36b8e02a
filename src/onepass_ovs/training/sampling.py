"""Seeds and data order: which sample each rank reads at each step, and its generator.

Everything the run consumes is a pure function of ``(config.seed, step)``:

* data order: epoch ``e`` is ``randperm(len(dataset))`` seeded by ``(seed, e)``, padded
  and sharded across ranks like ``DistributedSampler``; the per-rank streams of epochs
  are concatenated, and optimizer step ``k`` reads positions
  ``[k * B * A, (k + 1) * B * A)`` of this rank's stream (``B`` = batch_size,
  ``A`` = grad_accum_steps). Batches may straddle an epoch boundary.
* augmentation: ``sample_transform(sample, generator)`` gets a fresh ``torch.Generator``
  seeded by ``(seed, epoch, index)``, so it does not depend on workers or on resume.

A :class:`~onepass_ovs.data.DatasetError` raised while loading a sample in a loader
worker reaches the training process as the same error with its own one-line message
(not wrapped in the worker's traceback): see :func:`raise_if_failed`.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info

from ..data.classes import DatasetError
from .config import TrainConfig

__all__ = [
    "SampleFailure",
    "SampleOrder",
    "build_loader",
    "derive_seed",
    "raise_if_failed",
    "seed_everything",
]


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed that is a stable function of ``parts`` (unlike ``hash()``)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and all GPUs), numpy and python ``random``.

    Call it before building the model so that its initialisation is reproducible;
    :meth:`~onepass_ovs.training.trainer.Trainer.fit` reseeds per rank on a fresh start.
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


class StepBatchSampler(Sampler[list[tuple[int, int]]]):
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


@dataclass(frozen=True)
class SampleFailure:
    """A :class:`~onepass_ovs.data.DatasetError` raised in a loader worker, in transit.

    A worker's exception would reach the training process re-raised with the worker's
    whole traceback as its message; this carries the error's type and own message
    instead, as the batch, and :func:`raise_if_failed` raises it there.
    """

    error_type: type[DatasetError]
    message: str


def raise_if_failed(batch: Any) -> Any:
    """Re-raise a :class:`SampleFailure` as its error; return any other batch as is."""
    if isinstance(batch, SampleFailure):
        raise batch.error_type(batch.message)
    return batch


class KeyedDataset(Dataset):
    """Maps an ``(epoch, index)`` key to ``sample_transform(dataset[index], generator)``.

    In a loader worker a :class:`~onepass_ovs.data.DatasetError` becomes a
    :class:`SampleFailure` item (see :class:`FailureAwareCollate`).
    """

    def __init__(self, dataset: Any, sample_transform: Callable | None, seed: int):
        self.dataset = dataset
        self.sample_transform = sample_transform
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        epoch, index = key
        try:
            sample = self.dataset[index]
            if self.sample_transform is None:
                return sample
            generator = torch.Generator().manual_seed(derive_seed(self.seed, epoch, index))
            return self.sample_transform(sample, generator)
        except DatasetError as err:
            if get_worker_info() is None:
                raise
            return SampleFailure(type(err), str(err))


class FailureAwareCollate:
    """``collate_fn`` that passes a batch's first :class:`SampleFailure` on instead."""

    def __init__(self, collate_fn: Callable[[list[Any]], Any]):
        self.collate_fn = collate_fn

    def __call__(self, items: list[Any]) -> Any:
        for item in items:
            if isinstance(item, SampleFailure):
                return item
        return self.collate_fn(items)


def build_loader(
    dataset: Any,
    config: TrainConfig,
    *,
    start_step: int,
    rank: int,
    world_size: int,
    collate_fn: Callable[[list[Any]], Any],
    sample_transform: Callable | None,
    pin_memory: bool,
) -> DataLoader:
    """The loader of micro-batches ``start_step * grad_accum_steps`` on, to the end.

    Its batches may be :class:`SampleFailure`: pass each through :func:`raise_if_failed`.
    """
    order = SampleOrder(len(dataset), seed=config.seed, rank=rank, world_size=world_size)
    micro_steps = config.grad_accum_steps
    batch_sampler = StepBatchSampler(
        order,
        start=start_step * config.batch_size * micro_steps,
        batch_size=config.batch_size,
        num_batches=(config.steps - start_step) * micro_steps,
    )
    return DataLoader(
        KeyedDataset(dataset, sample_transform, config.seed),
        batch_sampler=batch_sampler,
        num_workers=config.num_workers,
        collate_fn=FailureAwareCollate(collate_fn),
        pin_memory=pin_memory,
        # Without its own generator the loader draws its worker base seed from the
        # global torch RNG, which would shift dropout masks after a resume.
        generator=torch.Generator().manual_seed(
            derive_seed(config.seed, rank, start_step, "loader")
        ),
    )
