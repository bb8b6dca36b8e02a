"""``ovs-segment``: segment images or folders of images from the command line."""

from __future__ import annotations

import json
import os
import sys
from collections import Counter
from pathlib import Path

# OpenMP threads that spin while waiting make a busy machine 10-100x slower (each process
# burns its cores waiting for the others): the CLI waits passively unless told otherwise.
# This must happen before torch (and its OpenMP runtime) is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import typer  # noqa: E402
from typer.core import TyperCommand  # noqa: E402

# Training-free ViT-B/16 CLIP: works on any vocabulary without a trained head. Offline and
# not cached, loading it fails at once with a message pointing at `--model demo`.
DEFAULT_MODEL = "clip:ViT-B-16/openai"
CLASSES_FILE = "classes.json"
_MULTI_VALUE_OPTIONS = ("--classes", "-c")
_HUB_TIMEOUT_S = 3.0

HELP = """Segment images or folders of images against any list of class names.

Example: ovs-segment photo.jpg shots/ --classes cat sofa "tv, television" --model demo -o out

Arguments are image files and folders (not recursive) only. --classes takes one or more
names up to the next option (or repeat it: -c cat -c dog); put the inputs first, or end
the class list with "--". For each image it writes NAME_labels.png (pixel value = class
index, 255 = unknown; 16-bit with more than 255 classes) and, with --overlay,
NAME_overlay.jpg; classes.json in the output folder maps pixel values to class names.
NAME is the file's stem, or its path when two inputs share a stem. An image that cannot
be read or segmented is skipped with a one-line message; the exit status is 1 if any
was, 2 for a usage or setup error.
"""

# Plain (non-rich) help: rich markup would eat "[@rev]", and rich crops long lines at the
# terminal width instead of wrapping them.
HELP_SETTINGS = {"max_content_width": 120, "help_option_names": ["-h", "--help"]}

segment_app = typer.Typer(
    add_completion=False, help=HELP, rich_markup_mode=None, context_settings=HELP_SETTINGS
)


class CliError(Exception):
    """A usage or setup error: printed as one line, exit status 2."""


def expand_multi_value(args: list[str], names=_MULTI_VALUE_OPTIONS) -> list[str]:
    """``--classes a b c`` -> ``--classes a --classes b --classes c`` (click gives an option
    one value). Values run up to the next token starting with "-", or "--"; everything after
    "--" is left alone. ``--classes=a`` stays one value."""
    out: list[str] = []
    index = 0
    while index < len(args):
        token = args[index]
        index += 1
        if token == "--":
            out.append(token)
            out.extend(args[index:])
            break
        out.append(token)
        if token in names:
            first = True
            while index < len(args) and not _is_option(args[index]):
                if not first:
                    out.append(token)
                out.append(args[index])
                first = False
                index += 1
    return out


def _is_option(token: str) -> bool:
    return token.startswith("-") and len(token) > 1


class _SegmentCommand(TyperCommand):
    """Typer's command with ``--classes`` taking several values."""

    def parse_args(self, ctx, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, expand_multi_value(list(args)))
        except Exception as err:
            # click's usage errors print the usage, a hint and the error: make them one line
            if hasattr(err, "format_message") and hasattr(err, "show"):
                line = f"error: {' '.join(err.format_message().split())} (see ovs-segment --help)"
                err.show = lambda file=None, line=line: typer.secho(
                    line, fg=typer.colors.RED, err=True
                )
            raise


def _version(value: bool) -> None:
    if value:
        from . import __version__

        typer.echo(f"ovs-segment (onepass_ovs) {__version__}")
        raise typer.Exit()


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text


def _fail(message: str) -> None:
    typer.secho(f"error: {' '.join(message.split())}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)


@segment_app.command(cls=_SegmentCommand, help=HELP)
def segment(
    inputs: list[str] = typer.Argument(
        None, metavar="IMAGE_OR_DIR...", help="Image files and/or folders of images.", show_default=False
    ),
    classes: list[str] = typer.Option(
        None, "--classes", "-c", metavar="NAME...",
        help='Class names (required): --classes cat sofa "tv, television" (a comma separates '
        "synonyms of one class).", show_default=False,
    ),
    model: str = typer.Option(
        DEFAULT_MODEL, "--model", "-m",
        help="Preset name (demo: small, offline), local folder, 'hf-hub:org/repo[@rev]' or "
        "'clip:<model>/<tag>' (training-free open_clip ViT).",
    ),
    output_dir: Path = typer.Option(Path("."), "--output-dir", "-o", help="Where outputs go."),
    overlay: bool = typer.Option(
        False, "--overlay", help="Also write NAME_overlay.jpg (with a legend).", show_default=False
    ),
    json_out: bool = typer.Option(
        False, "--json", show_default=False,
        help="Print a JSON list, one object per input image: image, labels, classes "
        "(fraction of pixels per present class), overlay; or image and error if it failed.",
    ),
    device: str = typer.Option(None, "--device", help="cpu or cuda (default: cuda if available)."),
    batch_size: int = typer.Option(4, "--batch-size", min=1, help="Images per forward pass."),
    unknown_threshold: float = typer.Option(
        None, "--unknown-threshold", min=0.0, max=1.0,
        help="Pixels less likely than this become 'unknown' (255 in the PNG).",
    ),
    background: str = typer.Option(
        None, "--background",
        help="The class meaning 'none of the others' (its synonyms are summed); pixels below "
        "--unknown-threshold get it instead of 'unknown'; left unpainted in overlays.",
    ),
    size: str = typer.Option(
        None, "--size",
        help="Working resolution: short side in pixels, or 'original' (large images are "
        "processed in sliding windows).",
    ),
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Segment images against the given classes (see the description above)."""
    try:
        failed = _run(
            inputs or [], classes or [], model, output_dir, overlay, json_out, device,
            batch_size, unknown_threshold, background, size,
        )
    except CliError as err:
        _fail(str(err))
    except (typer.Exit, typer.Abort, KeyboardInterrupt):
        raise
    except Exception as err:  # anything unexpected: still one line (traceback on request)
        if os.environ.get("ONEPASS_OVS_TRACEBACK"):
            raise
        _fail(f"{type(err).__name__}: {_one_line(err)} (set ONEPASS_OVS_TRACEBACK=1 for details)")
    if failed:
        raise typer.Exit(code=1)


def _run(
    inputs, classes, model, output_dir, overlay, json_out, device, batch_size,
    unknown_threshold, background, size,
) -> int:
    """The whole command; returns the number of images that failed."""
    images = _collect_images(inputs)
    vocabulary = _check_vocabulary(classes, background)
    working_size = _parse_size(size)
    device = _check_device(device)
    seg = _load_model(model, device)
    names = output_names(images)

    output_dir.mkdir(parents=True, exist_ok=True)
    _write_class_map(output_dir / CLASSES_FILE, vocabulary)
    from tqdm.auto import tqdm

    bar = tqdm(
        total=len(images), desc="segment", unit="img", disable=len(images) < 2 or not sys.stderr.isatty(), file=sys.stderr,
    )

    def say(message: str) -> None:
        if bar.disable:
            typer.echo(message, err=True)
        else:
            bar.write(message, file=sys.stderr)

    report: list[dict] = []
    options = dict(
        unknown_threshold=unknown_threshold, background=background, size=working_size,
        progress=False,
    )
    try:
        for start in range(0, len(images), batch_size):
            batch = list(zip(images[start : start + batch_size], names[start : start + batch_size], strict=True))
            for entry in _segment_batch(seg, batch, vocabulary, options, batch_size, output_dir, overlay):
                report.append(entry)
                if "error" in entry:
                    say(f"skipped {entry['image']}: {entry['error']}")
                elif not json_out:
                    top = ", ".join(f"{n} {f:.1%}" for n, f in list(entry["classes"].items())[:5])
                    line = f"{entry['image']} -> {entry['labels']}  [{top}]"
                    if bar.disable:
                        typer.echo(line)
                    else:
                        bar.write(line, file=sys.stdout)
                bar.update(1)
    finally:
        bar.close()
    failed = sum("error" in entry for entry in report)
    if json_out:
        typer.echo(json.dumps(report, indent=2))
    done = len(report) - failed
    summary = f"segmented {done} of {len(report)} image{'s' if len(report) != 1 else ''}"
    summary += f" into {output_dir}" + (f"; {failed} failed (listed above)" if failed else "")
    typer.echo(summary, err=True)
    return failed


def _segment_batch(seg, batch, vocabulary, options, batch_size, output_dir: Path, overlay: bool):
    """One report entry per (path, name) of the batch, in order; a bad image fails alone."""
    from .images import load_image

    entries: list[dict | None] = [None] * len(batch)
    loaded = []
    for position, (path, name) in enumerate(batch):
        try:
            loaded.append((position, path, name, load_image(path)))
        except Exception as err:
            entries[position] = {"image": str(path), "error": _one_line(err)}
    results = None
    if loaded:
        try:
            results = seg.segment([item[3] for item in loaded], vocabulary, batch_size=batch_size, **options)
        except Exception:
            results = None  # find the culprit: one image at a time
    for index, (position, path, name, image) in enumerate(loaded):
        try:
            result = results[index] if results is not None else seg.segment(image, vocabulary, **options)
            entries[position] = _write_outputs(result, path, name, image, output_dir, overlay)
        except Exception as err:
            entries[position] = {"image": str(path), "error": _one_line(err)}
    return entries


def _write_outputs(result, path: Path, name: str, image, output_dir: Path, overlay: bool) -> dict:
    labels_path = output_dir / f"{name}_labels.png"
    result.save(labels_path)
    entry = {"image": str(path), "labels": str(labels_path), "classes": result.fractions()}
    if overlay:
        overlay_path = output_dir / f"{name}_overlay.jpg"
        result.overlay(image).save(overlay_path, quality=92)
        entry["overlay"] = str(overlay_path)
    return entry


# -- checks before any model is loaded -----------------------------------------------------


def _collect_images(inputs: list[str]) -> list[Path]:
    """Files as given, folders expanded to their images (sorted, not recursive)."""
    from .images import IMAGE_SUFFIXES

    if not inputs:
        raise CliError(
            "no input images: give image files or folders before --classes (or end the class "
            "list with --), e.g. ovs-segment photo.jpg --classes cat dog"
        )
    empty = [i for i, text in enumerate(inputs) if not text.strip()]
    if empty:
        raise CliError(f"input {empty[0] + 1} is an empty path")
    missing = [text for text in inputs if not Path(text).exists()]
    if missing:
        listed = ", ".join(repr(m) for m in missing)
        raise CliError(f"no such image file or folder: {listed}")
    images: list[Path] = []
    for text in inputs:
        path = Path(text)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
            if not found:
                raise CliError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in folder {path}")
            images.extend(found)
        else:
            images.append(path)
    return images


def _check_vocabulary(classes: list[str], background: str | None) -> list[str]:
    from .images import IMAGE_SUFFIXES
    from .text import parse_vocabulary

    if not classes:
        raise CliError('no classes: give them with --classes, e.g. --classes cat dog "tv, television"')
    try:
        synonyms = parse_vocabulary(classes)
    except (TypeError, ValueError) as err:
        raise CliError(f"--classes: {err}") from err
    for name in classes:
        path = Path(name)
        if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
            raise CliError(
                f"class name {name!r} is an image file: put the inputs before --classes, "
                "or end the class list with --"
            )
    if background is not None:
        key = " ".join(background.split()).lower()
        known = {" ".join(c.split()).lower() for c in classes}
        known |= {n.lower() for names in synonyms for n in names}
        if key not in known:
            raise CliError(f"--background {background!r} is not one of the classes {classes}")
    return list(classes)


def _parse_size(size: str | None):
    if size is None:
        return None
    if size == "original":
        return size
    if not (size.isdigit() and int(size) > 0):
        raise CliError(f"--size must be a positive number of pixels or 'original', got {size!r}")
    return int(size)


def _check_device(device: str | None) -> str | None:
    if device is None:
        return None
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError) as err:
        raise CliError(f"--device {device!r} is not a device: {_one_line(err)}") from err
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise CliError(f"--device {device}: no CUDA GPU is available here; use --device cpu")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise CliError(
                f"--device {device}: there are only {torch.cuda.device_count()} CUDA device(s)"
            )
    elif parsed.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise CliError(f"--device {device}: MPS is not available here; use --device cpu")
    elif parsed.type != "cpu":
        raise CliError(f"--device {device}: use cpu or cuda")
    return device


def _load_model(model: str, device: str | None):
    """The Segmenter; a model that needs a download fails at once when the Hub is out of
    reach (no retries), with one message."""
    from . import Segmenter
    from .hub import ModelNotAvailableError, hub_offline

    hint = "" if model == "demo" else "; or try --model demo (small, offline)"
    try:
        return Segmenter.from_pretrained(model, device=device, local_files_only=True)
    except ModelNotAvailableError as err:
        local_error = err
    except (ValueError, OSError) as err:
        raise CliError(f"cannot load model {model!r}: {_one_line(err)}") from err
    remote = model.startswith(("hf-hub:", "clip:")) and not Path(model.split(":", 1)[1]).exists()
    if not remote:
        raise CliError(f"{_one_line(local_error)}{hint}")
    if hub_offline(False):
        raise CliError(
            f"model {model!r} is not in the local Hugging Face cache and downloads are disabled "
            "(HF_HUB_OFFLINE is set): "
            f"download it once with network access, or pass a local folder{hint}"
        )
    endpoint = _unreachable_hub()
    if endpoint is not None:
        raise CliError(
            f"model {model!r} is not in the local Hugging Face cache and {endpoint} cannot be "
            f"reached (offline?): download it once with network access, or pass a local "
            f"folder{hint}"
        )
    try:
        return Segmenter.from_pretrained(model, device=device)
    except (ModelNotAvailableError, ValueError, OSError) as err:
        raise CliError(f"{_one_line(err)}{hint}") from err


def _unreachable_hub() -> str | None:
    """The Hub's address if a TCP connection to it fails within a few seconds, else None."""
    import socket
    from urllib.parse import urlparse

    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    url = urlparse(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "", port), timeout=_HUB_TIMEOUT_S):
            return None
    except OSError:
        return endpoint


# -- output names ---------------------------------------------------------------------------


def output_names(images: list[Path]) -> list[str]:
    """A distinct output name per image: its stem, or, for inputs sharing a stem, its path
    relative to their common folder with "__" for "/" (and the suffix if still needed).

    Names are compared case-insensitively (as on macOS / Windows file systems); any clash
    left gets "-2", "-3", ...
    """
    stems = [p.stem for p in images]
    counts = Counter(s.lower() for s in stems)
    names = list(stems)
    for stem in {s for s in counts if counts[s] > 1}:
        group = [i for i, s in enumerate(stems) if s.lower() == stem]
        paths = [images[i].resolve() for i in group]
        root = Path(os.path.commonpath([str(p.parent) for p in paths]))
        relative = ["__".join(p.relative_to(root).with_suffix("").parts) for p in paths]
        again = Counter(r.lower() for r in relative)
        for i, path, rel in zip(group, paths, relative, strict=True):
            names[i] = rel if again[rel.lower()] == 1 else f"{rel}_{path.suffix.lstrip('.')}"
    seen: set[str] = set()
    out = []
    for name in names:
        unique, n = name, 2
        while unique.lower() in seen:
            unique, n = f"{name}-{n}", n + 1
        seen.add(unique.lower())
        out.append(unique)
    return out


def _write_class_map(path: Path, vocabulary: list[str]) -> None:
    """classes.json: {pixel value (as a string): class name} for the label PNGs."""
    unknown = 255 if len(vocabulary) <= 255 else 65535
    mapping = {str(i): name for i, name in enumerate(vocabulary)}
    mapping[str(unknown)] = "unknown"
    path.write_text(json.dumps(mapping, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def main() -> None:  # pragma: no cover - console entry point
    segment_app()


if __name__ == "__main__":  # pragma: no cover
    main()
