"""Draw the pictures of the docs (PIL + numpy + torch only; no matplotlib).

    python docs/figures/make_figures.py [--out docs/figures] [--shapes-json numbers.json] [--quick]

Writes into ``--out``:

- ``shapes_scenes.png``: shapes-world scenes next to their label maps, with a legend
  (unseen classes marked).
- ``severance.png``: the shipped ``demo`` model's per-patch cosine similarity of the dense
  CLIP features to one class's text embedding, without severance and with each variant.
- ``cal_heatmaps.png``: a few of the demo's proposals (soft masks) next to their CAL
  heatmaps (gated attention averaged over heads), labelled with their class.
- ``sliding_windows.png``: a 384 x 384 mosaic with the demo's window layout drawn on it,
  and the blended label map beside it.
- ``shapes_table.png``: bar chart of the shapes-world results table (seen / unseen / hIoU).

``--shapes-json`` takes ``{"rows": [{"model": ..., "seen": .., "unseen": .., "hiou": ..}]}``;
the default is the table in ``docs/benchmarks.md`` (see ``SHAPES_TABLE``). ``--quick``
draws fewer scenes (for the tests); the model figures are cheap either way.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

# The "Shapes world" table of docs/benchmarks.md (benchmarks/shapes.py --num 300, all 31
# names as the vocabulary): seen mIoU, unseen mIoU, hIoU per row. Re-run with
# --shapes-json when that table changes.
SHAPES_TABLE = {
    "source": "docs/benchmarks.md, 'Shapes world' table",
    "rows": [
        {"model": "DeOP (demo)", "seen": 12.1, "unseen": 7.7, "hiou": 9.4},
        {"model": "two-stream", "seen": 6.2, "unseen": 2.8, "hiou": 3.9},
        {"model": "training-free (clip:demo)", "seen": 4.4, "unseen": 1.2, "hiou": 1.9},
    ],
}

SEVERANCE_VARIANTS = ("none", "weighted", "identity", "mask-guided")
SCENE_SEED = 7  # the scene of the model figures
SEVERANCE_SIDE = 160  # panel side of severance.png: image, then one map per variant
BACKGROUND = (255, 255, 255)
INK = (20, 20, 20)


# -- drawing helpers -------------------------------------------------------------------------


def _font():
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=12)
    except TypeError:  # Pillow < 10.1 has only the bitmap font
        return ImageFont.load_default()


def heat_colours(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """(H, W) floats -> (H, W, 3) uint8 on a dark-blue -> teal -> yellow ramp over [low, high]."""
    anchors = np.array(
        [[48, 18, 59], [50, 100, 200], [30, 180, 160], [160, 220, 60], [250, 240, 40]], float
    )
    t = np.clip((values - low) / max(high - low, 1e-12), 0.0, 1.0) * (len(anchors) - 1)
    i = np.minimum(t.astype(int), len(anchors) - 2)
    frac = (t - i)[..., None]
    return (anchors[i] * (1 - frac) + anchors[i + 1] * frac).round().astype(np.uint8)


def upscale(rgb: np.ndarray, side: int):
    """(h, w, 3) uint8 -> PIL image ``side`` x ``side`` (nearest: patches stay visible)."""
    from PIL import Image

    return Image.fromarray(rgb).resize((side, side), Image.NEAREST)


def row_boxes(sizes, *, gap: int = 8, title_height: int = 32, heading: bool = False):
    """Where :func:`titled_row` puts panels of (width, height) ``sizes``: their
    (x0, y0, x1, y1) boxes and the (width, height) of the whole row."""
    top = (20 if heading else 0) + title_height
    boxes, x = [], gap
    for width, height in sizes:
        boxes.append((x, top, x + width, top + height))
        x += width + gap
    return boxes, (x, top + max(h for _, h in sizes) + gap)


def titled_row(panels, titles, *, gap: int = 8, title_height: int = 32, heading: str = ""):
    """Paste PIL panels side by side with a title over each -> (PIL image, panel boxes)."""
    from PIL import Image, ImageDraw

    font = _font()
    boxes, size = row_boxes(
        [p.size for p in panels], gap=gap, title_height=title_height, heading=bool(heading)
    )
    canvas = Image.new("RGB", size, BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    if heading:
        draw.text((gap, 4), heading, fill=INK, font=font)
    for panel, title, box in zip(panels, titles, boxes, strict=True):
        draw.multiline_text((box[0], box[1] - title_height + 2), title, fill=INK, font=font, spacing=2)
        canvas.paste(panel, box[:2])
    return canvas, boxes


def stack(images, gap: int = 6):
    """Stack PIL images vertically (left-aligned) -> one PIL image."""
    from PIL import Image

    width = max(im.width for im in images)
    canvas = Image.new("RGB", (width, sum(im.height for im in images) + gap * (len(images) - 1)), BACKGROUND)
    y = 0
    for im in images:
        canvas.paste(im, (0, y))
        y += im.height + gap
    return canvas


def colour_bar(low: float, high: float, width: int = 256, height: int = 12):
    """A horizontal colour bar for :func:`heat_colours` with its end values -> PIL image."""
    from PIL import Image, ImageDraw

    ramp = heat_colours(np.linspace(low, high, width)[None].repeat(height, 0), low, high)
    canvas = Image.new("RGB", (width + 120, height + 4), BACKGROUND)
    canvas.paste(Image.fromarray(ramp), (50, 2))
    draw = ImageDraw.Draw(canvas)
    draw.text((0, 1), f"{low:+.2f}", fill=INK, font=_font())
    draw.text((width + 56, 1), f"{high:+.2f}", fill=INK, font=_font())
    return canvas


def label_colours(label: np.ndarray, colours: np.ndarray) -> np.ndarray:
    """(H, W) ids -> (H, W, 3) uint8; negative ids (unknown) are black."""
    out = np.zeros(label.shape + (3,), np.uint8)
    known = label >= 0
    out[known] = colours[label[known]]
    return out


# -- 1. scenes and label maps ---------------------------------------------------------------


def shapes_scenes(out: Path, quick: bool) -> Path:
    """Scenes, their label maps in the library's class colours, and a legend."""
    from PIL import Image, ImageDraw

    from onepass_ovs.result import class_colours
    from onepass_ovs.toy.scenes import CLASS_NAMES, UNSEEN_CLASSES, render_scene

    colours = class_colours(CLASS_NAMES)
    seeds = (3, 11) if quick else (3, 11, 21, 42)
    side = 128
    rows, present = [], set()
    for seed in seeds:
        scene = render_scene(seed, side)
        present.update(int(c) for c in np.unique(scene.label))
        row, _ = titled_row(
            [Image.fromarray(scene.image), Image.fromarray(label_colours(scene.label, colours))],
            [f"scene (seed {seed})", "label map"],
            title_height=18,
        )
        rows.append(row)
    grid = stack(rows)

    font = _font()
    names = [CLASS_NAMES[i] for i in sorted(present)]
    legend = Image.new("RGB", (190, max(grid.height, 22 + 18 * len(names))), BACKGROUND)
    draw = ImageDraw.Draw(legend)
    draw.text((4, 8), "* = unseen in training", fill=INK, font=font)
    for row, name in enumerate(names):
        y = 30 + 18 * row
        draw.rectangle((4, y, 18, y + 12), fill=tuple(int(v) for v in colours[CLASS_NAMES.index(name)]), outline=INK)
        mark = " *" if name in UNSEEN_CLASSES else ""
        draw.text((24, y), name + mark, fill=INK, font=font)
    canvas = Image.new("RGB", (grid.width + legend.width, max(grid.height, legend.height)), BACKGROUND)
    canvas.paste(grid, (0, 0))
    canvas.paste(legend, (grid.width, 0))
    return _save(canvas, out / "shapes_scenes.png")


# -- 2. patch severance ---------------------------------------------------------------------


def _demo_scene():
    from onepass_ovs.toy.scenes import render_scene

    scene = render_scene(SCENE_SEED, 128, num_objects=3)
    return scene


def _image_tensor(image: np.ndarray):
    import torch

    return torch.from_numpy(image).permute(2, 0, 1).float().div(255).unsqueeze(0)


def severance_maps(segmenter, image: np.ndarray, class_name: str) -> dict[str, np.ndarray]:
    """Per-patch cosine similarity (h, w) of the dense CLIP features to ``class_name``'s
    text embedding, for each severance variant (``"none"`` = plain CLIP blocks).

    Each variant is the demo's config with ``clip.severance`` replaced and the demo's
    weights loaded; the proposals (same weights) supply the masks the variants read.
    ``image``: (H, W, 3) uint8 with H, W multiples of the patch (no padding).
    """
    import torch

    from onepass_ovs.models.deop import DeOP
    from onepass_ovs.models.preprocessing import normalise

    base = segmenter.model
    pre = base.config.preprocess
    state = base.state_dict()
    images = _image_tensor(image)
    maps = {}
    with torch.no_grad():
        text = segmenter.encode_text([class_name]).float()[0]  # (E,)
        for variant in SEVERANCE_VARIANTS:
            model = DeOP(base.config.replace(**{"clip.severance": variant}))
            model.load_state_dict(state)
            model.eval()
            mask_logits = model.encode_image(images)["mask_logits"]
            clip_in = normalise(images, pre.clip_mean, pre.clip_std, None)
            dense, grid = model.clip_visual(clip_in, mask_logits)  # (1, h*w, E) normalised
            maps[variant] = (dense[0] @ text).reshape(grid).numpy()
    return maps


def severance_figure(segmenter, out: Path) -> Path:
    from PIL import Image

    scene = _demo_scene()
    class_name = scene.objects[0].class_name
    maps = severance_maps(segmenter, scene.image, class_name)
    low = min(float(m.min()) for m in maps.values())
    high = max(float(m.max()) for m in maps.values())
    side = SEVERANCE_SIDE
    panels = [Image.fromarray(scene.image).resize((side, side), Image.BILINEAR)]
    titles = ["image"]
    demo_variant = segmenter.config.clip.severance
    for variant, values in maps.items():
        panels.append(upscale(heat_colours(values, low, high), side))
        shipped = " (demo)" if variant == demo_variant else ""
        titles.append(f"severance: {variant}{shipped}\nmean {values.mean():+.3f}")
    row, _ = titled_row(
        panels, titles,
        heading=f"cosine similarity of each patch's CLIP feature to \"{class_name}\" (same colour scale)",
    )
    return _save(stack([row, colour_bar(low, high)]), out / "severance.png")


# -- 3. CAL heatmaps -------------------------------------------------------------------------


def cal_heatmaps(segmenter, image: np.ndarray) -> dict:
    """The demo's proposals on ``image`` and their CAL heatmaps, computed as
    :meth:`AnchorPooling.forward` does in eval mode.

    Returns a dict of numpy arrays: ``masks`` (N, h', w') soft masks in [0, 1];
    ``heatmaps`` (N, h, w), the gated attention A_h * G averaged over heads;
    ``head_heatmaps`` (heads, N, h*w), per head; ``values`` (heads, h*w, d), the raw CLIP
    features CAL pools; ``pooled`` (N, E), the model's own pooled embeddings; ``logits``
    (N, K + 1) against ``CLASS_NAMES``, void last. ``head_heatmaps @ values``, heads
    concatenated and L2-normalised, is ``pooled``.
    """
    import torch

    from onepass_ovs.models.anchors import proposal_gate
    from onepass_ovs.models.layers import sine_position_embedding
    from onepass_ovs.models.preprocessing import normalise
    from onepass_ovs.toy.scenes import CLASS_NAMES

    model = segmenter.model
    cal = model.anchors
    pre = model.config.preprocess
    images = _image_tensor(image)
    with torch.no_grad():
        encoding = model.encode_image(images)
        mask_logits = encoding["mask_logits"]
        clip_in = normalise(images, pre.clip_mean, pre.clip_std, None)
        dense, grid = model.clip_visual(clip_in, mask_logits)
        gate = proposal_gate(mask_logits, grid)  # (1, N, L)
        pos = sine_position_embedding(*grid, cal.dim, device=dense.device, dtype=dense.dtype)
        query_pos = cal.query_pos.weight.unsqueeze(0)
        anchors = cal.decoder(torch.zeros_like(query_pos), dense, query_pos, pos)
        q = anchors + query_pos
        mixed = cal.out_attn(q, q, anchors, need_weights=False)[0]
        anchors = cal.out_norm(anchors + mixed)
        heads = cal.num_heads
        qh = cal.q_proj(anchors + query_pos).unflatten(-1, (heads, -1)).transpose(1, 2)
        kh = cal.k_proj(dense + pos).unflatten(-1, (heads, -1)).transpose(1, 2)
        vh = dense.unflatten(-1, (heads, -1)).transpose(1, 2)  # (1, heads, L, d)
        attention = (qh @ kh.transpose(-1, -2) * qh.shape[-1] ** -0.5).softmax(-1)  # (1, heads, N, L)
        head_heatmaps = attention * gate[:, None]
        logits = model.classify(encoding["pooled"], segmenter.encode_text(list(CLASS_NAMES)))[0]
    return {
        "masks": mask_logits[0].sigmoid().numpy(),
        "heatmaps": head_heatmaps.mean(1)[0].reshape(-1, *grid).numpy(),
        "head_heatmaps": head_heatmaps[0].numpy(),
        "values": vh[0].numpy(),
        "pooled": encoding["pooled"][0].numpy(),
        "logits": logits.numpy(),
    }


def cal_figure(segmenter, out: Path, count: int = 4) -> Path:
    from PIL import Image

    from onepass_ovs.toy.scenes import CLASS_NAMES

    scene = _demo_scene()
    cal = cal_heatmaps(segmenter, scene.image)
    masks, heatmaps, logits = cal["masks"], cal["heatmaps"], cal["logits"]
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    # per class, the proposal the demo is most sure of; then the surest of those
    best = probs[:, :-1].max(-1)
    chosen, classes_seen = [], set()
    for n in np.argsort(-best, kind="stable"):
        k = int(probs[n, :-1].argmax())
        if k not in classes_seen:
            chosen.append(int(n))
            classes_seen.add(k)
        if len(chosen) == count:
            break
    side = 128
    picture = Image.fromarray(scene.image)
    mask_panels, mask_titles, heat_panels, heat_titles = [picture], ["image"], [], []
    for n in chosen:
        k = int(probs[n, :-1].argmax())
        mask_up = np.asarray(
            Image.fromarray((masks[n] * 255).astype(np.uint8)).resize((side, side), Image.BILINEAR), float
        )[..., None] / 255
        shown = (np.asarray(scene.image, float) * (0.3 + 0.7 * mask_up)).round().astype(np.uint8)
        mask_panels.append(Image.fromarray(shown))
        mask_titles.append(f"proposal {n}: soft mask\n-> {CLASS_NAMES[k]} ({probs[n, k]:.2f})")
        heat = heatmaps[n]
        heat_panels.append(upscale(heat_colours(heat, 0.0, float(heat.max())), side))
        heat_titles.append(f"CAL heatmap {n}\n(scale 0 to {heat.max():.1e})")
    top, _ = titled_row(mask_panels, mask_titles)
    blank = Image.new("RGB", (side, side), BACKGROUND)
    bottom, _ = titled_row([blank] + heat_panels, [""] + heat_titles)
    rows = [top, bottom]
    return _save(stack(rows), out / "cal_heatmaps.png")


# -- 4. sliding windows ----------------------------------------------------------------------


def mosaic(side: int = 128, tiles: int = 3) -> np.ndarray:
    """A (tiles * side, tiles * side, 3) uint8 mosaic of shapes-world scenes."""
    from onepass_ovs.toy.scenes import render_scene

    rows = [
        np.concatenate([render_scene(100 + r * tiles + c, side).image for c in range(tiles)], 1)
        for r in range(tiles)
    ]
    return np.concatenate(rows, 0)


def sliding_figure(segmenter, out: Path) -> Path:
    from PIL import Image, ImageDraw

    from onepass_ovs.images import window_boxes
    from onepass_ovs.result import class_colours
    from onepass_ovs.sliding import window_layout
    from onepass_ovs.toy.scenes import CLASS_NAMES

    image = mosaic()
    pre = segmenter.config.preprocess
    windows = window_layout(None, pre)
    multiple = pre.pad_multiple
    canvas = tuple(-(-s // multiple) * multiple for s in image.shape[:2])  # size="original"
    boxes = window_boxes(canvas, windows.window, windows.stride)
    picture = Image.fromarray(image)
    draw = ImageDraw.Draw(picture)
    palette = [(255, 60, 60), (60, 200, 255), (255, 220, 0), (200, 80, 255), (80, 255, 120), (255, 140, 0)]
    for i, (y0, x0, y1, x1) in enumerate(boxes):
        inset = 2 + 3 * i
        draw.rectangle((x0 + inset, y0 + inset, x1 - 1 - inset, y1 - 1 - inset),
                       outline=palette[i % len(palette)], width=3)
    result = segmenter.segment(image, list(CLASS_NAMES), size="original")
    labels = label_colours(np.asarray(result.label_map), class_colours(CLASS_NAMES))
    row, _ = titled_row(
        [picture, Image.fromarray(labels)],
        [f"{image.shape[1]} x {image.shape[0]} image, {len(boxes)} windows of {windows.window}"
         f" (stride {windows.stride})", "blended label map (size=\"original\")"],
        title_height=18,
    )
    return _save(row, out / "sliding_windows.png")


# -- 5. the shapes-world table ---------------------------------------------------------------


def shapes_table_figure(table: dict, out: Path) -> Path:
    """Grouped bars (seen / unseen / hIoU) per row of the shapes-world table."""
    from PIL import Image, ImageDraw

    rows = table["rows"]
    if not rows:
        raise ValueError("shapes table has no rows")
    metrics = (("seen", "seen mIoU", (60, 110, 200)), ("unseen", "unseen mIoU", (230, 130, 40)),
               ("hiou", "hIoU", (60, 160, 80)))
    for row in rows:
        missing = [key for key, _, _ in metrics if key not in row] + ([] if "model" in row else ["model"])
        if missing:
            raise ValueError(f"shapes table row {row!r} lacks {missing}")
    font = _font()
    bar, group_gap, left, top, plot_h = 26, 40, 50, 40, 220
    width = left + len(rows) * (3 * bar + group_gap) + 20
    height = top + plot_h + 60
    top_value = max(10.0, max(float(r[k]) for r in rows for k, _, _ in metrics))
    top_value = float(np.ceil(top_value / 10) * 10)
    canvas = Image.new("RGB", (max(width, 420), height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    draw.text((left, 6), "shapes world, 300 scenes (docs/benchmarks.md)", fill=INK, font=font)
    for i, (_, label, colour) in enumerate(metrics):
        x = left + 130 * i
        draw.rectangle((x, 22, x + 10, 32), fill=colour)
        draw.text((x + 14, 21), label, fill=INK, font=font)
    base = top + plot_h
    for tick in np.linspace(0, top_value, 6):
        y = base - plot_h * tick / top_value
        draw.line((left - 4, y, canvas.width - 10, y), fill=(225, 225, 225))
        draw.text((4, y - 6), f"{tick:.0f}", fill=INK, font=font)
    draw.line((left, top, left, base), fill=INK)
    for g, row in enumerate(rows):
        x0 = left + 10 + g * (3 * bar + group_gap)
        for i, (key, _, colour) in enumerate(metrics):
            value = float(row[key])
            x = x0 + i * bar
            draw.rectangle((x, base - plot_h * value / top_value, x + bar - 3, base), fill=colour)
            draw.text((x, base - plot_h * value / top_value - 13), f"{value:.1f}", fill=INK, font=font)
        draw.multiline_text((x0, base + 6), _wrap(str(row["model"]), 18), fill=INK, font=font)
    draw.line((left, base, canvas.width - 10, base), fill=INK)
    return _save(canvas, out / "shapes_table.png")


def _wrap(text: str, width: int) -> str:
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return "\n".join(lines + [line])


# -- main ------------------------------------------------------------------------------------


def _save(image, path: Path) -> Path:
    image.save(path, optimize=True)
    return path


def load_shapes_table(path: str | None) -> dict:
    if path is None:
        return SHAPES_TABLE
    data = json.loads(Path(path).read_text())
    if not isinstance(data, dict) or not isinstance(data.get("rows"), list):
        raise ValueError(f"{path}: expected a JSON object with a 'rows' list")
    return data


def main(argv=None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent))
    parser.add_argument("--shapes-json", default=None, help="numbers of the shapes-world table")
    parser.add_argument("--quick", action="store_true", help="fewer scenes (tests)")
    args = parser.parse_args(argv)

    import torch

    from onepass_ovs import Segmenter

    torch.manual_seed(0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table = load_shapes_table(args.shapes_json)
    demo = Segmenter.from_pretrained("demo", device="cpu")
    written = [
        shapes_scenes(out, args.quick),
        severance_figure(demo, out),
        cal_figure(demo, out, count=2 if args.quick else 4),
        sliding_figure(demo, out),
        shapes_table_figure(table, out),
    ]
    for path in written:
        print(path)
    return written


if __name__ == "__main__":
    sys.exit(main() and 0)
