"""Tiny model/data for the engine tests, and the torchrun worker of the two-process test.

Imported by path from ``tests/test_engine.py`` (helpers) and run as
``torchrun --standalone --nproc_per_node 2 tests/_engine_worker.py OUT_DIR`` (main).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from onepass_ovs.training.config import TrainConfig
from onepass_ovs.training.distributed import destroy_distributed, unwrap
from onepass_ovs.training.sampling import seed_everything
from onepass_ovs.training.trainer import Trainer

NUM_CLASSES = 3


class TinySegNet(nn.Module):
    """conv -> GroupNorm -> +pos -> ReLU -> dropout -> conv: (B, 3, H, W) -> (B, 3, H, W)."""

    def __init__(self, dropout: float = 0.2):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = nn.GroupNorm(2, 8)
        self.pos = nn.Parameter(torch.zeros(1, 8, 1, 1))
        self.drop = nn.Dropout(dropout)
        self.head = nn.Conv2d(8, NUM_CLASSES, 3, padding=1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(F.relu(self.norm(self.stem(images)) + self.pos)))


class TinySegData(torch.utils.data.Dataset):
    """``n`` random 3x8x8 images; the target of a pixel is its brightest channel."""

    def __init__(self, n: int = 24):
        generator = torch.Generator().manual_seed(1234)
        self.images = torch.randn(n, 3, 8, 8, generator=generator)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        image = self.images[index]
        return {"image": image, "target": image.argmax(0), "index": index}


def flip_and_noise(sample: dict, generator: torch.Generator) -> dict:
    """Random horizontal flip + small noise, drawn from the per-sample generator only."""
    image, target = sample["image"], sample["target"]
    if torch.rand((), generator=generator) < 0.5:
        image, target = image.flip(-1), target.flip(-1)
    image = image + 0.05 * torch.randn(image.shape, generator=generator)
    return {**sample, "image": image, "target": target}


def segmentation_loss(model: nn.Module, batch: dict) -> dict:
    logits = model(batch["image"])
    loss = F.cross_entropy(logits.float(), batch["target"])
    return {"loss": loss, "pixel_acc": (logits.argmax(1) == batch["target"]).float().mean()}


def make_trainer(output_dir, *, dropout=0.2, loss_fn=segmentation_loss, **overrides) -> Trainer:
    """A Trainer on a freshly seeded TinySegNet (identical init for every call)."""
    values = dict(
        steps=10,
        batch_size=4,
        lr=1e-2,
        weight_decay=1e-4,
        log_every=1,
        checkpoint_every=0,
        num_workers=0,
        seed=7,
        progress_bar=False,
        output_dir=str(output_dir),
        device="cpu",
    )
    values.update(overrides)
    seed_everything(0)
    model = TinySegNet(dropout=dropout)
    return Trainer(
        model, loss_fn, TinySegData(), TrainConfig(**values), sample_transform=flip_and_noise
    )


class CrashAt:
    """A loss_fn that raises on its ``crash_call``-th call: a kill in mid-interval."""

    def __init__(self, crash_call: int):
        self.crash_call = crash_call
        self.calls = 0

    def __call__(self, model, batch):
        self.calls += 1
        if self.calls == self.crash_call:
            raise KeyboardInterrupt("simulated kill")
        return segmentation_loss(model, batch)


def _save_weights(model: nn.Module, path: Path) -> None:
    save_file({k: v.contiguous() for k, v in unwrap(model).state_dict().items()}, path)


def main(out: Path) -> None:
    """Run under torchrun: every rank writes its final weights as rank{r}_*.safetensors."""
    # 1. No dropout, 2 x batch 2 per step: comparable with one process at batch 4.
    trainer = make_trainer(out / "ddp", dropout=0.0, steps=4, batch_size=2)
    rank = trainer.dist.rank
    _save_weights(trainer.fit(), out / f"rank{rank}_ddp.safetensors")

    # 2. Dropout on: uninterrupted vs killed after the step-3 checkpoint, then resumed.
    full = make_trainer(out / "full", steps=6, checkpoint_every=3)
    _save_weights(full.fit(), out / f"rank{rank}_full.safetensors")
    crashing = make_trainer(out / "resumed", steps=6, checkpoint_every=3, loss_fn=CrashAt(5))
    try:
        crashing.fit()
    except KeyboardInterrupt:
        pass
    torch.manual_seed(999)  # the resumed run must not depend on the process's RNG
    resumed = make_trainer(out / "resumed", steps=6, checkpoint_every=3)
    _save_weights(resumed.fit(resume="auto"), out / f"rank{rank}_resumed.safetensors")
    destroy_distributed()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
