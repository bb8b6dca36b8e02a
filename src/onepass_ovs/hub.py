"""Model names -> folders holding ``config.json`` + ``model.safetensors``; weight I/O.

Names a user can give:

- a pretrained preset (``list_models(pretrained_only=True)``), e.g. ``"demo"``, shipped
  inside the package;
- ``"hf-hub:org/repo"`` or ``"hf-hub:org/repo@revision"``: downloaded and cached by
  huggingface_hub (``HF_HUB_OFFLINE`` / ``local_files_only`` / ``cache_dir`` honoured);
- a local folder with the two files;
- ``"clip:..."``: a training-free model built from an open_clip checkpoint
  (:func:`resolve_clip`).

Architecture presets (``deop-tiny``, ``deop-vit-b16``) have no weights: build them with
``Segmenter.from_config``. Loading never unpickles: safetensors + JSON only.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"

# name -> folder inside the package (pretrained presets)
PRETRAINED_PRESETS = {"demo": "weights/demo", "demo-gkc": "weights/demo-gkc", "demo-sed": "weights/demo-sed"}


class ModelNotAvailableError(OSError):
    """A model name that cannot be resolved to weights here (missing, offline, unknown)."""


def list_models(pretrained_only: bool = False) -> list[str]:
    """Named models: pretrained presets, then architecture presets (random init)."""
    from .models.registry import list_presets

    names = sorted(PRETRAINED_PRESETS)
    if not pretrained_only:
        names += list_presets()
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
                f"model {name!r} ({filename}) is not in {where} and "
                + ("downloads are disabled (HF_HUB_OFFLINE=1 or local_files_only=True)"
                   if offline else "the download failed")
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
    from .models.registry import list_presets

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
    if text in list_presets():
        raise ModelNotAvailableError(
            f"{text!r} is an architecture preset without weights: use "
            f"Segmenter.from_config({text!r}) for a randomly initialised model"
        )
    raise ModelNotAvailableError(
        f"unknown model {text!r}: not a preset ({', '.join(list_models())}), not a folder, "
        "and not 'hf-hub:org/repo' or 'clip:<open_clip model>/<tag>'"
    )


# Attribute set on a model by load_weights: {state key: dtype in the file}.
_STORED_DTYPES = "_onepass_stored_dtypes"


def save_weights(model: nn.Module, path: str | os.PathLike, metadata: dict | None = None) -> None:
    """Write the model's state dict as safetensors (atomically).

    Each tensor keeps its dtype, except weights that :func:`load_weights` read from a
    narrower dtype (an fp16 file run in fp32): they are written back in it when the cast is
    exact, so a loaded-and-saved model keeps its file size.
    """
    from safetensors.torch import save_file

    from . import __version__

    stored = getattr(model, _STORED_DTYPES, {})
    state = {}
    for key, value in model.state_dict().items():
        value = value.detach().contiguous().cpu()
        # weights loaded from a narrower dtype (fp16 files run in fp32) go back to it when
        # that is exact: saving does not double the file; changed weights stay as they are
        narrow = stored.get(key)
        if narrow is not None and narrow != value.dtype and value.is_floating_point():
            cast = value.to(narrow)
            if torch.equal(cast.to(value.dtype), value):
                value = cast
        state[key] = value
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
    setattr(model, _STORED_DTYPES, {k: t.dtype for k, t in state.items() if t.is_floating_point()})
    for key, tensor in state.items():
        if tensor.shape != expected[key].shape:
            raise ValueError(
                f"weights {path}: {key} has shape {tuple(tensor.shape)}, "
                f"the model expects {tuple(expected[key].shape)}"
            )
        state[key] = tensor.to(expected[key].dtype)
    with torch.no_grad():
        model.load_state_dict(state, strict=True)


# -- training-free "clip:" models: open_clip checkpoints or the CLIP inside a saved model --

OPEN_CLIP_CONFIG_NAME = "open_clip_config.json"
OPEN_CLIP_WEIGHTS_NAME = "open_clip_model.safetensors"
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


@dataclass(frozen=True)
class ClipSource:
    """Where a training-free model's CLIP comes from (see :func:`resolve_clip`).

    Either an open_clip checkpoint: ``model_cfg`` (open_clip's model config, with
    ``quick_gelu`` resolved from the pretrained tag), ``weights`` (a safetensors file) and
    ``preprocess`` (open_clip's ``mean``/``std``/``interpolation`` where known); or
    ``folder``, a saved onepass model whose CLIP parts are reused.
    """

    name: str
    model_cfg: dict | None = None
    weights: Path | None = None
    preprocess: dict = field(default_factory=dict)
    folder: Path | None = None


def resolve_clip(
    name: str,
    pretrained: str | None = None,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
) -> ClipSource:
    """Resolve a training-free model name (``clip:`` prefix optional) to its CLIP weights.

    - ``ViT-B-16/openai`` or ``ViT-B-16`` + ``pretrained="openai"``: an open_clip model
      config and pretrained tag; the tag's Hub repo gives the safetensors weights (a local
      ``.safetensors`` file may stand in for the tag);
    - ``hf-hub:org/repo[@rev]``: an open_clip Hub repo (``open_clip_config.json`` +
      ``open_clip_model.safetensors``);
    - ``local-dir:/path`` or a folder holding ``open_clip_config.json``: the same pair locally;
    - a pretrained preset (``demo``) or a saved onepass folder: the CLIP inside it.

    Weights come through huggingface_hub (``cache_dir``, ``revision``, ``HF_HUB_OFFLINE`` and
    ``local_files_only`` honoured). Pickled checkpoints (``.bin``, ``.pt``) are refused.
    """
    spec = str(name)
    spec = spec[len("clip:") :] if spec.startswith("clip:") else spec
    display = f"clip:{spec}"
    if not spec:
        raise ValueError("empty CLIP model name: use e.g. 'clip:ViT-B-16/openai'")
    if spec.startswith(("hf-hub:", "local-dir:")) and pretrained:
        raise ValueError(f"{display!r} carries its own weights; drop pretrained={pretrained!r}")
    if spec.startswith("hf-hub:"):
        folder = _fetch_clip_files(
            display, spec, [OPEN_CLIP_CONFIG_NAME, OPEN_CLIP_WEIGHTS_NAME],
            revision=revision, cache_dir=cache_dir, local_files_only=local_files_only,
        )
        return _open_clip_folder(folder, display, weights=folder / OPEN_CLIP_WEIGHTS_NAME)
    if spec.startswith("local-dir:"):
        return _open_clip_folder(Path(spec[len("local-dir:") :]).expanduser(), display)
    path = Path(spec).expanduser()
    if path.is_dir():
        if (path / OPEN_CLIP_CONFIG_NAME).is_file():
            return _open_clip_folder(path, display)
        return ClipSource(display, folder=resolve_model_dir(path))
    if spec in PRETRAINED_PRESETS:
        return ClipSource(display, folder=resolve_model_dir(spec))
    return _open_clip_tag(
        spec, pretrained, display,
        revision=revision, cache_dir=cache_dir, local_files_only=local_files_only,
    )


def _open_clip_tag(spec, pretrained, display, **download) -> ClipSource:
    import open_clip

    model_name, _, tag = spec.partition("/")
    if tag and pretrained and tag != pretrained:
        raise ValueError(f"{display!r} names tag {tag!r} but pretrained={pretrained!r}")
    tag = tag or pretrained
    model_cfg = open_clip.get_model_config(model_name)
    if model_cfg is None:
        raise ModelNotAvailableError(
            f"unknown CLIP model {display!r}: open_clip has no model config {model_name!r} "
            "(see open_clip.list_models()); other forms: 'clip:hf-hub:org/repo', "
            "'clip:local-dir:/path', 'clip:demo'"
        )
    tags = open_clip.list_pretrained_tags_by_model(model_name)
    if not tag:
        raise ValueError(
            f"{display!r} names no pretrained weights: use 'clip:{model_name}/<tag>' with a tag "
            f"from {tags}; random weights: Segmenter.from_config(clip_model_config(...))"
        )
    tag_file = Path(tag).expanduser()
    if tag_file.is_file():
        weights = _safetensors_only(tag_file, display)
        return ClipSource(display, model_cfg=model_cfg, weights=weights)
    tag_cfg = open_clip.get_pretrained_cfg(model_name, tag)
    if not tag_cfg:
        raise ModelNotAvailableError(
            f"unknown CLIP weights {display!r}: open_clip has no tag {tag!r} for {model_name!r} "
            f"(tags: {', '.join(tags) or 'none'})"
        )
    # The tag decides details the architecture name does not (OpenAI's weights need
    # QuickGELU): without this the weights would load into a subtly different network.
    if tag_cfg.get("quick_gelu"):
        model_cfg["quick_gelu"] = True
    preprocess = {k: tag_cfg[k] for k in ("mean", "std", "interpolation") if k in tag_cfg}
    hub = tag_cfg.get("hf_hub", "")
    if not hub:
        raise ModelNotAvailableError(
            f"CLIP weights {display!r} are published only as a pickled checkpoint "
            f"({tag_cfg.get('url', '?')}); onepass_ovs loads safetensors only: convert them "
            "with safetensors and use 'clip:local-dir:<folder>'"
        )
    repo, filename = hub.rstrip("/"), ""
    if not hub.endswith("/"):
        repo, filename = hub.rsplit("/", 1)
    filename = _safetensors_name(filename, display)
    folder = _fetch_clip_files(display, f"hf-hub:{repo}", [filename], **download)
    return ClipSource(display, model_cfg, folder / filename, preprocess)


def _safetensors_name(filename: str, display: str) -> str:
    """The safetensors file published next to an open_clip Hub checkpoint name."""
    if not filename or filename == "open_clip_pytorch_model.bin":
        return OPEN_CLIP_WEIGHTS_NAME
    if filename.endswith(".safetensors"):
        return filename
    stem, suffix = os.path.splitext(filename)
    if suffix in (".bin", ".pth", ".pt"):
        return stem + ".safetensors"
    raise ModelNotAvailableError(f"CLIP weights {display!r} ({filename}) are not safetensors")


def _safetensors_only(path: Path, display: str) -> Path:
    if path.suffix != ".safetensors":
        raise ModelNotAvailableError(
            f"{display!r}: {path.name} is not a .safetensors file; onepass_ovs never unpickles "
            "checkpoints (convert it with safetensors.torch.save_file)"
        )
    return path


def _open_clip_folder(folder: Path, display: str, weights: Path | None = None) -> ClipSource:
    """An open_clip checkpoint folder: ``open_clip_config.json`` + safetensors weights."""
    config_path = folder / OPEN_CLIP_CONFIG_NAME
    if not config_path.is_file():
        raise ModelNotAvailableError(f"{display!r}: no {OPEN_CLIP_CONFIG_NAME} in {folder}")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{config_path}: not a valid JSON config ({err})") from err
    if "model_cfg" not in config:
        raise ValueError(f"{config_path} has no 'model_cfg': not an open_clip Hub config")
    if weights is None:
        preferred = [OPEN_CLIP_WEIGHTS_NAME, "open_clip_pytorch_model.safetensors"]
        found = [folder / p for p in preferred if (folder / p).is_file()]
        found = found or sorted(folder.glob("*.safetensors"))
        if not found:
            pickles = sorted(p.name for p in folder.iterdir() if p.suffix in _PICKLE_SUFFIXES)
            raise ModelNotAvailableError(
                f"{display!r}: no .safetensors weights in {folder}"
                + (f" (only pickled {', '.join(pickles)}: onepass_ovs never loads those)"
                   if pickles else "")
            )
        weights = found[0]
    preprocess = config.get("preprocess_cfg", {})
    preprocess = {k: preprocess[k] for k in ("mean", "std", "interpolation") if k in preprocess}
    return ClipSource(display, config["model_cfg"], weights, preprocess)


def _fetch_clip_files(display: str, hub_name: str, filenames: list[str], **download) -> Path:
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    try:
        return download_files(hub_name, filenames, **download)
    except ModelNotAvailableError as err:
        hint = ""
        cause = err.__cause__
        if isinstance(cause, EntryNotFoundError) and not isinstance(cause, LocalEntryNotFoundError):
            hint = " (onepass_ovs loads safetensors weights only, never pickled .bin files)"
        message = f"CLIP model {display!r} is not available: {err}{hint}"
        raise ModelNotAvailableError(message) from err


def upload_model_folder(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    token: str | None = None,
    commit_message: str = "Upload onepass_ovs model",
    revision: str | None = None,
):
    """Upload a saved model folder to the Hub in one commit (creating the repo, and the
    ``revision`` branch, if missing); returns huggingface_hub's ``CommitInfo``."""
    from huggingface_hub import HfApi

    if repo_id.startswith("hf-hub:"):
        repo_id = repo_id[len("hf-hub:") :]
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise ValueError(f"invalid Hub repo id {repo_id!r}: expected 'org/name'")
    folder = Path(folder)
    missing = [n for n in (CONFIG_NAME, WEIGHTS_NAME) if not (folder / n).is_file()]
    if missing:
        raise FileNotFoundError(f"{folder} lacks {missing}: not a saved onepass_ovs model")
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    if revision is not None:
        api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
    return api.upload_folder(
        repo_id=repo_id, folder_path=str(folder), commit_message=commit_message,
        revision=revision, repo_type="model",
    )
