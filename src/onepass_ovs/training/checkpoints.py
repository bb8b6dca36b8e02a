"""Atomic, pickle-free training checkpoints: write, list, read (verified) and restore.

Layout (under a run's ``output_dir``)::

    checkpoints/step_00001000/   one folder per checkpoint, renamed into place atomically
        model.safetensors        model state dict (frozen params optional)
        optimizer.safetensors    every tensor of the optimizer state, flattened
        rng.safetensors          RNG state tensors of every rank
        trainer_state.json       step, config, optimizer scalars and param groups,
                                 python/numpy RNG scalars, size and sha256 of each file

A checkpoint is built in a hidden sibling folder and renamed into place, so a kill at
any point leaves either no ``step_X`` folder or a complete one. A folder damaged later
(a truncated copy, a full disk, a bad sector) fails :func:`read_checkpoint` with a
:class:`CheckpointError` naming it; resuming then falls back to the previous one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .distributed import unwrap

__all__ = [
    "CHECKPOINT_FORMAT",
    "CheckpointData",
    "CheckpointError",
    "capture_rng",
    "checkpoint_folders",
    "checkpoint_step",
    "find_latest_checkpoint",
    "is_complete",
    "list_checkpoints",
    "load_model_state",
    "load_model_weights",
    "prune_checkpoints",
    "read_checkpoint",
    "restore_rng",
    "write_checkpoint",
    "write_json_atomic",
]

CHECKPOINT_FORMAT = "onepass_ovs.train_checkpoint/1"
CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_NAME = re.compile(r"^step_(\d{8,})$")
TENSOR_FILES = ("model.safetensors", "optimizer.safetensors", "rng.safetensors")
STATE_FILE = "trainer_state.json"
CHECKPOINT_FILES = (*TENSOR_FILES, STATE_FILE)


class CheckpointError(ValueError):
    """A checkpoint folder is incomplete or damaged; the message names it and why."""


# --------------------------------------------------------------------------------------
# Pickle-free serialisation helpers
# --------------------------------------------------------------------------------------


def split_tensors(obj: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """JSON skeleton of ``obj`` with every tensor moved to ``tensors[<path>]``.

    The skeleton holds ``{"__tensor__": <path>}`` where a tensor was. Dict keys become
    strings; tuples become lists (callers restore what they need).
    """
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj.detach().to("cpu").contiguous()
        return {"__tensor__": prefix}
    if isinstance(obj, Mapping):
        return {str(k): split_tensors(v, f"{prefix}.{k}", tensors) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [split_tensors(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    raise TypeError(f"cannot checkpoint a {type(obj).__name__} at {prefix!r} without pickle")


def join_tensors(obj: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    """Inverse of :func:`split_tensors`."""
    if isinstance(obj, dict):
        if set(obj) == {"__tensor__"}:
            return tensors[obj["__tensor__"]]
        return {k: join_tensors(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [join_tensors(v, tensors) for v in obj]
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


def _file_digest(path: Path) -> dict[str, Any]:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return {"bytes": path.stat().st_size, "sha256": digest.hexdigest()}


def write_json_atomic(path: Path, payload: Any) -> None:
    """Write ``payload`` as JSON to ``path`` through a temporary file and a rename."""
    temp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(temp, "w") as handle:
        json.dump(payload, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temp, path)
    _fsync_dir(path.parent)


# --------------------------------------------------------------------------------------
# RNG state
# --------------------------------------------------------------------------------------


def capture_rng(device: torch.device) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """This process's global RNG states: ``(tensors, JSON scalars)``."""
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


def restore_rng(
    tensors: Mapping[str, torch.Tensor], scalars: Mapping[str, Any], device: torch.device
) -> None:
    """Inverse of :func:`capture_rng`."""
    torch.set_rng_state(tensors["torch_cpu"])
    if device.type == "cuda" and "cuda" in tensors:
        torch.cuda.set_rng_state(tensors["cuda"], device)
    kind, position, has_gauss, cached_gaussian = scalars["numpy"]
    keys = tensors["numpy_keys"].numpy().astype(np.uint32)
    np.random.set_state((kind, keys, position, has_gauss, cached_gaussian))
    version, python_state, gauss_next = scalars["python"]
    random.setstate((version, tuple(python_state), gauss_next))


# --------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------


def write_checkpoint(
    final_dir: Path,
    *,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    rng_by_rank: list[tuple[dict, dict]],
    config: dict[str, Any],
    world_size: int,
    save_frozen_params: bool = True,
) -> None:
    """Write one checkpoint folder atomically (see the module docstring for the layout).

    ``final_dir`` is ``<output_dir>/checkpoints/step_XXXXXXXX``; ``rng_by_rank`` holds
    :func:`capture_rng` of every rank; ``config`` is the run's ``TrainConfig.to_dict()``.
    A folder of the same step (left by an abandoned run) is replaced.
    """
    root = final_dir.parent
    root.mkdir(parents=True, exist_ok=True)
    # Build the whole checkpoint in a hidden sibling folder, then rename it into
    # place: a kill at any point leaves either no step_X folder or a complete one.
    temp_dir = root / f".{final_dir.name}.tmp-{os.getpid()}"
    if temp_dir.exists():
        shutil.rmtree(temp_dir)
    temp_dir.mkdir()
    metadata = {"format": CHECKPOINT_FORMAT, "step": str(step)}

    model_state = model.state_dict()
    if not save_frozen_params:
        frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
        model_state = {k: v for k, v in model_state.items() if k not in frozen}
    save_file(_unshare(model_state), temp_dir / "model.safetensors", metadata=metadata)

    optimizer_tensors: dict[str, torch.Tensor] = {}
    optimizer_skeleton = split_tensors(optimizer.state_dict(), "optimizer", optimizer_tensors)
    save_file(_unshare(optimizer_tensors), temp_dir / "optimizer.safetensors", metadata=metadata)

    rng_tensors: dict[str, torch.Tensor] = {}
    rng_scalars: dict[str, Any] = {}
    for rank, (tensors, scalars) in enumerate(rng_by_rank):
        rng_tensors.update({f"rank{rank}.{k}": v.cpu() for k, v in tensors.items()})
        rng_scalars[f"rank{rank}"] = scalars
    save_file(_unshare(rng_tensors), temp_dir / "rng.safetensors", metadata=metadata)

    state = {
        "format": CHECKPOINT_FORMAT,
        "step": step,
        "world_size": world_size,
        "config": config,
        "optimizer_class": type(optimizer).__name__,
        "optimizer": optimizer_skeleton,
        "rng": rng_scalars,
        "files": {name: _file_digest(temp_dir / name) for name in TENSOR_FILES},
        "torch_version": torch.__version__,
        "time": time.time(),
    }
    with open(temp_dir / STATE_FILE, "w") as handle:
        json.dump(state, handle)
    for name in CHECKPOINT_FILES:
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


def prune_checkpoints(output_dir: str | os.PathLike, keep: int | None, step: int) -> None:
    """Delete leftovers of interrupted writes, and all but the newest ``keep``
    checkpoints at or before ``step`` (``keep`` None keeps them all)."""
    root = Path(output_dir) / CHECKPOINT_DIR
    for path in root.iterdir():
        # Leftovers of interrupted writes (our own final rename has happened already).
        if path.name.startswith(".step_"):
            shutil.rmtree(path, ignore_errors=True)
    if keep is None:
        return
    # Never delete checkpoints ahead of the current step: they belong to another
    # trajectory, and the user decided about them when choosing what to resume.
    past = [path for saved, path in list_checkpoints(output_dir) if saved <= step]
    for path in past[:-keep]:
        shutil.rmtree(path, ignore_errors=True)


# --------------------------------------------------------------------------------------
# Finding
# --------------------------------------------------------------------------------------


def checkpoint_step(path: Path) -> int | None:
    """The step of a ``step_XXXXXXXX`` folder name, None for any other name."""
    match = CHECKPOINT_NAME.match(path.name)
    return int(match.group(1)) if match else None


def is_complete(path: Path) -> bool:
    """Every file present and a state file of this format and step (tensors unverified)."""
    step = checkpoint_step(path)
    if step is None or not path.is_dir():
        return False
    if not all((path / name).is_file() for name in CHECKPOINT_FILES):
        return False
    try:
        state = json.loads((path / STATE_FILE).read_text())
    except (OSError, ValueError):
        return False
    return (
        isinstance(state, dict)
        and state.get("format") == CHECKPOINT_FORMAT
        and (state.get("step") == step)
    )


def checkpoint_folders(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Every ``step_XXXXXXXX`` folder under ``output_dir``, complete or not, oldest first."""
    root = Path(output_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        step = checkpoint_step(path)
        if step is not None and path.is_dir():
            found.append((step, path))
    return sorted(found)


def list_checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``output_dir`` as ``(step, path)``, oldest first.

    Complete means every file present and a state file of this format and step; the
    tensor files are verified only when read (:func:`read_checkpoint`). Temporary
    folders of an interrupted write never qualify: they are hidden (``.`` prefix) until
    the final rename.
    """
    return [(step, path) for step, path in checkpoint_folders(output_dir) if is_complete(path)]


def find_latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint folder under ``output_dir``, or None."""
    checkpoints = list_checkpoints(output_dir)
    return checkpoints[-1][1] if checkpoints else None


# --------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------


@dataclass
class CheckpointData:
    """A checkpoint read into memory (CPU tensors), verified but not yet applied."""

    path: Path
    step: int
    state: dict[str, Any]
    """``trainer_state.json``."""
    model: dict[str, torch.Tensor]
    optimizer: dict[str, torch.Tensor]
    """The optimizer's tensors, keyed as in ``state["optimizer"]``'s skeleton."""
    rng: dict[str, torch.Tensor]

    def optimizer_state_dict(self) -> dict[str, Any]:
        """The optimizer's ``state_dict()`` as saved (tuples came back as lists)."""
        optimizer_state = join_tensors(self.state["optimizer"], self.optimizer)
        optimizer_state["state"] = {int(k): v for k, v in optimizer_state["state"].items()}
        return optimizer_state


def read_checkpoint(path: str | os.PathLike) -> CheckpointData:
    """Read and verify a checkpoint folder; :class:`CheckpointError` names what is wrong.

    Checks: the folder name, every file present, a readable state file of this format
    and step, each tensor file's size and sha256 as recorded (checkpoints written before
    the record existed skip this), and every tensor file readable as safetensors.
    """
    path = Path(path)
    step = checkpoint_step(path)
    if step is None or not path.is_dir():
        raise CheckpointError(f"{path} is not a checkpoint folder (step_XXXXXXXX)")
    missing = [name for name in CHECKPOINT_FILES if not (path / name).is_file()]
    if missing:
        raise CheckpointError(f"checkpoint {path} is incomplete: no {', '.join(missing)}")
    try:
        state = json.loads((path / STATE_FILE).read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise CheckpointError(f"checkpoint {path}: unreadable {STATE_FILE} ({err})") from err
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"checkpoint {path}: {STATE_FILE} is not of {CHECKPOINT_FORMAT}")
    if state.get("step") != step:
        raise CheckpointError(
            f"checkpoint {path}: {STATE_FILE} says step {state.get('step')}, not {step}"
        )
    for key in ("world_size", "config", "optimizer_class", "optimizer", "rng"):
        if key not in state:
            raise CheckpointError(f"checkpoint {path}: {STATE_FILE} lacks {key!r}")
    recorded = state.get("files", {})
    tensors: dict[str, dict[str, torch.Tensor]] = {}
    for name in TENSOR_FILES:
        file = path / name
        if name in recorded:
            expected = recorded[name]
            size = file.stat().st_size
            if size != expected.get("bytes"):
                raise CheckpointError(
                    f"checkpoint {path}: {name} has {size} bytes, {expected.get('bytes')} "
                    "were written (truncated or damaged)"
                )
            if _file_digest(file)["sha256"] != expected.get("sha256"):
                raise CheckpointError(f"checkpoint {path}: {name} fails its sha256 check")
        try:
            tensors[name] = load_file(file, device="cpu")
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"checkpoint {path}: cannot read {name} ({err})") from err
    return CheckpointData(
        path=path,
        step=step,
        state=state,
        model=tensors["model.safetensors"],
        optimizer=tensors["optimizer.safetensors"],
        rng=tensors["rng.safetensors"],
    )


def load_model_state(model: nn.Module, state: Mapping[str, torch.Tensor], where: Any) -> None:
    """Load ``state`` into ``model`` (unwrapped from DDP), strictly except that frozen
    parameters may be missing (``save_frozen_params=False``); ``where`` names the source."""
    target = unwrap(model)
    missing, unexpected = target.load_state_dict(dict(state), strict=False)
    frozen = {name for name, p in target.named_parameters() if not p.requires_grad}
    missing = [name for name in missing if name not in frozen]
    if missing or unexpected:
        raise RuntimeError(
            f"checkpoint {where} does not match the model: missing {missing}, "
            f"unexpected {unexpected}"
        )


def load_model_weights(model: nn.Module, checkpoint: str | os.PathLike) -> nn.Module:
    """Load a checkpoint's model weights (folder or its ``model.safetensors``) into ``model``.

    Strict, except that parameters left out by ``save_frozen_params=False`` may be
    missing (they keep the values ``model`` has). Returns ``model``.
    """
    path = Path(checkpoint)
    if path.is_dir():
        path = path / "model.safetensors"
    try:
        state = load_file(path, device="cpu")
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"cannot read checkpoint weights {path}: {err}") from err
    load_model_state(model, state, path)
    return model
