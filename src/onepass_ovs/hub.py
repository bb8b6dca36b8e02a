"""Model names -> folders holding ``config.json`` + ``model.safetensors``; weight I/O.

Names a user can give:

- a pretrained preset (``list_models(pretrained_only=True)``), e.g. ``"demo"``, shipped
  inside the package;
- ``"hf-hub:org/repo"`` or ``"hf-hub:org/repo@revision"``: downloaded and cached by
  huggingface_hub (``HF_HUB_OFFLINE`` / ``local_files_only`` / ``cache_dir`` honoured);
- a local folder with the two files.

Architecture presets (``deop-tiny``, ``deop-vit-b16``) have no weights: build them with
``Segmenter.from_config``. Loading never unpickles: safetensors + JSON only.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"

# name -> folder inside the package (pretrained presets)
PRETRAINED_PRESETS = {"demo": "weights/demo"}


class ModelNotAvailableError(OSError):
    """A model name that cannot be resolved to weights here (missing, offline, unknown)."""


def list_models(pretrained_only: bool = False) -> list[str]:
    """Named models: pretrained presets, then architecture presets (random init)."""
    from .config import PRESET_CONFIGS

    names = sorted(PRETRAINED_PRESETS)
    if not pretrained_only:
        names += sorted(PRESET_CONFIGS)
    return names


def package_weights_dir(name: str) -> Path:
    from importlib.resources import files

    return Path(str(files("onepass_ovs").joinpath(PRETRAINED_PRESETS[name])))


def parse_hub_id(name: str, revision: str | None = None) -> tuple[str, str | None]:
    """``hf-hub:org/repo[@rev]`` -> (``org/repo``, revision); ``revision`` wins over ``@rev``."""
    repo = name[len("hf-hub:") :]
    if "@" in repo:
        repo, at_rev = repo.split("@", 1)
        revision = revision or at_rev
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise ValueError(f"invalid Hub id {name!r}: expected 'hf-hub:org/repo[@revision]'")
    return repo, revision


def hub_offline(local_files_only: bool) -> bool:
    if local_files_only:
        return True
    value = os.environ.get("HF_HUB_OFFLINE", "")
    return value.upper() in {"1", "ON", "YES", "TRUE"}


def download_files(
    name: str,
    filenames: list[str],
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
) -> Path:
    """Fetch files of a ``hf-hub:`` model into the HF cache; return their snapshot folder."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    repo, revision = parse_hub_id(name, revision)
    offline = hub_offline(local_files_only)
    paths = []
    for filename in filenames:
        try:
            paths.append(
                hf_hub_download(
                    repo,
                    filename,
                    revision=revision,
                    cache_dir=cache_dir,
                    local_files_only=offline,
                    library_name="onepass_ovs",
                )
            )
        except (LocalEntryNotFoundError, OfflineModeIsEnabled) as err:
            where = cache_dir or "the default Hugging Face cache"
            raise ModelNotAvailableError(
                f"model {name!r} ({filename}) is not in {where} and downloads are "
                + ("disabled (HF_HUB_OFFLINE=1 or local_files_only=True)" if offline else "failed")
                + ". Download it once with network access, pass a local folder, or use the "
                "offline 'demo' model."
            ) from err
        except (RepositoryNotFoundError, RevisionNotFoundError) as err:
            raise ModelNotAvailableError(f"model {name!r} not found on the Hub: {err}") from err
        except EntryNotFoundError as err:
            raise ModelNotAvailableError(f"model {name!r} has no file {filename!r}") from err
    return Path(paths[0]).parent


def resolve_model_dir(
    name: str | os.PathLike,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
) -> Path:
    """A folder holding ``config.json`` and ``model.safetensors`` for ``name``."""
    from .config import PRESET_CONFIGS

    text = str(name)
    if text in PRETRAINED_PRESETS:
        folder = package_weights_dir(text)
        if not (folder / WEIGHTS_NAME).exists():
            raise ModelNotAvailableError(
                f"the {text!r} weights are not part of this installation ({folder}); "
                "rebuild them with `python -m onepass_ovs.toy.build`"
            )
        return folder
    if text.startswith("hf-hub:"):
        return download_files(
            text,
            [CONFIG_NAME, WEIGHTS_NAME],
            revision=revision,
            cache_dir=cache_dir,
            local_files_only=local_files_only,
        )
    path = Path(text).expanduser()
    if path.is_dir():
        missing = [f for f in (CONFIG_NAME, WEIGHTS_NAME) if not (path / f).is_file()]
        if missing:
            raise ModelNotAvailableError(f"model folder {path} lacks {', '.join(missing)}")
        return path
    if text in PRESET_CONFIGS:
        raise ModelNotAvailableError(
            f"{text!r} is an architecture preset without weights: use "
            f"Segmenter.from_config({text!r}) for a randomly initialised model"
        )
    raise ModelNotAvailableError(
        f"unknown model {text!r}: not a preset ({', '.join(list_models())}), not a folder, "
        "and not 'hf-hub:org/repo' or 'clip:<open_clip model>/<tag>'"
    )


def save_weights(model: nn.Module, path: str | os.PathLike, metadata: dict | None = None) -> None:
    """Write the model's state dict as safetensors (atomically)."""
    from safetensors.torch import save_file

    from . import __version__

    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    meta = {"format": "pt", "library": "onepass_ovs", "version": __version__}
    meta.update({k: str(v) for k, v in (metadata or {}).items()})
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_file(state, str(tmp), metadata=meta)
    os.replace(tmp, path)


def load_weights(model: nn.Module, path: str | os.PathLike) -> None:
    """Load safetensors weights into ``model`` (strict), casting to the model's dtypes."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise ValueError(f"cannot read weights {path}: {err}") from err
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"weights {path} do not match the model built from its config: "
            f"{len(missing)} missing (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})"
        )
    for key, tensor in state.items():
        if tensor.shape != expected[key].shape:
            raise ValueError(
                f"weights {path}: {key} has shape {tuple(tensor.shape)}, "
                f"the model expects {tuple(expected[key].shape)}"
            )
        state[key] = tensor.to(expected[key].dtype)
    with torch.no_grad():
        model.load_state_dict(state, strict=True)
