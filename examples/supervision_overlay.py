"""Segment a scene with the shipped demo model and draw it with supervision's annotators.

    pip install "onepass-ovs[supervision]"
    python examples/supervision_overlay.py [image] [--out overlay.png]

Each class present becomes one ``supervision.Detections`` entry (mask, box, class id,
confidence = the mean probability of the class over its pixels), so any supervision
annotator, filter or tracker works on open-vocabulary segments.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from onepass_ovs import Segmenter
from onepass_ovs.toy import scenes

HERE = Path(__file__).parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("image", nargs="?", default=str(HERE / "shapes_scene.png"))
    parser.add_argument("--out", default="supervision_overlay.png")
    args = parser.parse_args()

    import supervision as sv

    image = Image.open(args.image).convert("RGB")
    if min(image.size) < 384:  # room for the labels: draw small scenes enlarged
        factor = -(-384 // min(image.size))
        image = image.resize((image.width * factor, image.height * factor), Image.NEAREST)
    seg = Segmenter.from_pretrained("demo", device="cpu")
    result = seg.segment(image, list(scenes.CLASS_NAMES))  # label map at the image's size
    detections = result.to_supervision()
    detections = detections[detections.class_id != 0]  # leave the background undrawn

    scene = np.asarray(image).copy()
    labels = [
        f"{name} {confidence:.2f}"
        for name, confidence in zip(detections.data["class_name"], detections.confidence, strict=True)
    ]
    scene = sv.MaskAnnotator(opacity=0.5).annotate(scene, detections)
    scene = sv.LabelAnnotator(text_scale=0.4, text_padding=3).annotate(scene, detections, labels)
    Image.fromarray(scene).save(args.out)
    print(f"{len(detections)} segments: {', '.join(labels)} -> {args.out}")


if __name__ == "__main__":
    main()
