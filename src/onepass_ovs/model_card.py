"""A generated ``README.md`` model card for a saved or published model.

The card says what a user of the Hub page needs to run the model: the family and
architecture, how to load it, the vocabulary protocol (how class names become text
embeddings, synonyms, background), the preprocessing, and the metrics given by the
publisher (never invented: without ``metrics`` the card says none were reported).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path

from .config import ModelConfig

CARD_NAME = "README.md"

_TEMPLATE_NAMES = {
    "single": 'one template, "a photo of a {}."',
    "imagenet80": "the 80 ImageNet prompt templates of CLIP, averaged",
}


def _metric_rows(metrics: Mapping) -> list[tuple[str, str, str]]:
    """{metric: value} or {dataset: {metric: value}} -> (dataset, metric, value) rows."""
    rows = []
    for key, value in metrics.items():
        if isinstance(value, Mapping):
            for metric, number in value.items():
                rows.append((str(key), str(metric), _number(number, f"{key}.{metric}")))
        else:
            rows.append(("", str(key), _number(value, str(key))))
    return rows


def _number(value, where: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"metric {where!r} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"metric {where!r} is not finite: {value!r}")
    return f"{value:.4g}"


def _templates(config: ModelConfig) -> str:
    templates = config.text.templates
    if isinstance(templates, str):
        return _TEMPLATE_NAMES.get(templates, repr(templates))
    shown = ", ".join(f'"{t}"' for t in templates[:3])
    more = f" and {len(templates) - 3} more" if len(templates) > 3 else ""
    return f"{len(templates)} custom templates ({shown}{more}), averaged"


def model_card(
    config: ModelConfig,
    *,
    repo_id: str | None = None,
    metrics: Mapping | None = None,
    license: str | None = None,
    description: str | None = None,
) -> str:
    """The card's Markdown (with a YAML header) for a model of ``config``.

    ``metrics``: ``{"mIoU": 47.3}`` or ``{"ADE20K-150": {"mIoU": 29.1}, ...}``, shown as
    reported (numbers only); ``repo_id``: the Hub repo, for the loading snippet;
    ``license``: an SPDX id for the header; ``description``: a paragraph of your own.
    """
    from .models.registry import get_family

    family = get_family(config.family)
    name = config.name or config.family
    load_name = f"hf-hub:{repo_id}" if repo_id else "path/to/this/folder"
    pre = config.preprocess
    header = [
        "---",
        "library_name: onepass-ovs",
        "pipeline_tag: image-segmentation",
        "tags:",
        "- image-segmentation",
        "- semantic-segmentation",
        "- open-vocabulary",
        "- onepass-ovs",
        f"- {config.family}",
    ]
    if license:
        header.append(f"license: {license}")
    header.append("---")
    lines = [
        *header,
        "",
        f"# {name}",
        "",
        description or (
            f"An open-vocabulary semantic segmentation model of the **{config.family}** family "
            f"({family.description}), for the "
            "[onepass_ovs](https://pypi.org/project/onepass-ovs/) library: it segments an image "
            "against any list of class names."
        ),
        "",
        "## Use",
        "",
        "```python",
        "from onepass_ovs import Segmenter",
        "",
        f'seg = Segmenter.from_pretrained("{load_name}")',
        'result = seg.segment("image.jpg", ["cat", "dog, puppy", "sofa", "background"])',
        "result.label_map  # (H, W) indices into the vocabulary",
        "",
        "emb = seg.encode(\"image.jpg\")  # the image pass once, then any vocabulary:",
        'seg.segment(emb, ["person", "bicycle", "road"])',
        "```",
        "",
        "## Model",
        "",
        "| | |",
        "|---|---|",
        f"| family | `{config.family}` |",
        f"| name | `{name}` |",
        f"| CLIP | `{config.clip.model_name}` |",
        f"| config format | {config.format_version} |",
        "",
        "Files: `config.json` (the full architecture) and `model.safetensors` (the weights; "
        "nothing is ever unpickled).",
        "",
        "## Vocabulary protocol",
        "",
        "- The vocabulary is open: any list of class names, given at inference.",
        f"- Each name becomes a CLIP text embedding through {_templates(config)}"
        + (f", with {config.text.prompt_length} learned prompt context vectors"
           if config.text.prompt_length else "")
        + "; embeddings are L2-normalised and cached per name.",
        '- An entry `"a, b"` gives one class several names (synonyms): '
        + ("each name is scored and the class takes the best of them."
           if config.family == "gkc" else "their embeddings are averaged into one class."),
        '- `segment(..., background="background")` names the entry that means "none of the '
        'others": its synonyms are scored one by one and their probabilities summed, and '
        "pixels below `unknown_threshold` get it.",
        "- Class probabilities are normalised over the vocabulary given, so results depend on "
        "which other names are in it.",
        "",
        "## Preprocessing",
        "",
        f"- Resize so the short side is {pre.short_side} px (long side at most "
        f"{pre.max_long_side} px, {pre.interpolation} interpolation), then zero-pad to a "
        f"multiple of {pre.pad_multiple}.",
        f"- Normalisation: mean {list(pre.clip_mean)}, std {list(pre.clip_std)} (CLIP stream)"
        + ("" if (pre.mean, pre.std) == (pre.clip_mean, pre.clip_std)
           else f"; mean {list(pre.mean)}, std {list(pre.std)} (the other stream)")
        + ".",
        (f"- Working images larger than {pre.window} px on a side are segmented in "
         f"overlapping windows ({pre.window_blend} blending)."
         if pre.window > 0 else "- Always one pass over the whole working image (no windows)."),
        "- The label map comes back at the input image's own size.",
        "",
        "## Metrics",
        "",
    ]
    if metrics:
        rows = _metric_rows(metrics)
        lines += ["| dataset | metric | value |", "|---|---|---|"]
        lines += [f"| {d or '-'} | {m} | {v} |" for d, m, v in rows]
        lines += ["", "As reported by the publisher of this model."]
    else:
        lines.append("No metrics were reported with this upload.")
    lines += [
        "",
        "<details><summary>config.json</summary>",
        "",
        "```json",
        json.dumps(config.to_dict(), indent=2),
        "```",
        "",
        "</details>",
        "",
    ]
    return "\n".join(lines)


def write_model_card(folder: str | Path, config: ModelConfig, **card_options) -> Path:
    """Write :func:`model_card` as ``folder/README.md``; returns its path."""
    path = Path(folder) / CARD_NAME
    path.write_text(model_card(config, **card_options), encoding="utf-8")
    return path


__all__ = ["model_card", "write_model_card", "CARD_NAME"]
