"""Rebuild the README's example: the scene, its ground truth, and a model's overlay.

The scene is rendered from a fixed seed with one unseen class ("orange star": in the CLIP's
captions, never labelled in segmentation training), so the picture shows whether the model
names a class it was never trained to segment.

    python examples/make_readme_picture.py                 # the shipped `demo`
    python examples/make_readme_picture.py --model DIR     # any saved model

writes examples/shapes_scene.png (the scene), examples/shapes_scene_labels.png (its ground
truth, pixel value = index into VOCABULARY) and examples/shapes_scene_demo_output.png.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from onepass_ovs import Segmenter
from onepass_ovs.result import class_colours
from onepass_ovs.toy import scenes

HERE = Path(__file__).resolve().parent
SEED = 3
VOCABULARY = ["red circle", "blue square", "yellow star", "orange star", "background"]
SCALE = 3  # the scene is 128 px: enlarge it for the page


def _titled(picture: Image.Image, title: str) -> Image.Image:
    out = Image.new("RGB", (picture.width, picture.height + 18), "white")
    out.paste(picture, (0, 18))
    ImageDraw.Draw(out).text((4, 3), title, fill="black")
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--out", default=str(HERE / "shapes_scene_demo_output.png"))
    args = parser.parse_args(argv)

    scene = scenes.render_scene(SEED, size=128, classes=VOCABULARY[:4])
    image = Image.fromarray(scene.image)
    image.save(HERE / "shapes_scene.png")
    # ground truth as indices into VOCABULARY (every other class is absent from the scene)
    lookup = np.full(len(scenes.CLASS_NAMES), VOCABULARY.index("background"))
    for index, name in enumerate(VOCABULARY):
        lookup[scenes.class_id(name)] = index
    truth = lookup[scene.label].astype(np.uint8)
    Image.fromarray(truth).save(HERE / "shapes_scene_labels.png")

    big = image.resize((image.width * SCALE, image.height * SCALE), Image.NEAREST)
    seg = Segmenter.from_pretrained(args.model, device="cpu")
    result = seg.segment(big, VOCABULARY)  # resized to the model's working size inside

    colours = class_colours(VOCABULARY)
    painted = np.where(
        (truth == VOCABULARY.index("background"))[..., None], scene.image, colours[truth]
    ).astype(np.uint8)
    truth_big = Image.fromarray(painted).resize(big.size, Image.NEAREST)
    panels = [
        _titled(big, "image (orange star: unseen)"),
        _titled(truth_big, "ground truth"),
        _titled(result.overlay(big, alpha=0.6), f"{args.model}: overlay + legend"),
    ]
    sheet = Image.new("RGB", (sum(p.width for p in panels) + 16, max(p.height for p in panels)),
                      "white")
    x = 0
    for panel in panels:
        sheet.paste(panel, (x, 0))
        x += panel.width + 8
    sheet.save(args.out, optimize=True)
    print(f"wrote {args.out}: {result.fractions()}")


if __name__ == "__main__":
    main()
