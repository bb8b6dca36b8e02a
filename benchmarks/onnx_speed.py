"""onnxruntime vs torch on CPU: the same Segmenter.segment() call, image side swapped.

    python benchmarks/onnx_speed.py                       # demo at 128 px, deop-tiny at 256 px
    python benchmarks/onnx_speed.py --threads 1 --repeat 5

For each model the torch Segmenter is exported to a temporary folder, loaded with
``Segmenter.from_onnx`` and both segment the same shapes scene with the same vocabulary
(the text side is torch in both and cached after the warm-up, so the time is the image
pass plus pre/post-processing). Prints median wall times and torch / onnxruntime.
Needs ``pip install 'onepass-ovs[onnx]'``.
"""

from __future__ import annotations

import platform
import tempfile

import torch
from _common import parser_from_doc, timed


def main() -> None:
    parser = parser_from_doc(__doc__)
    parser.add_argument("--models", default="demo:128,deop-tiny:256",
                        help="comma-separated name:size pairs (size = scene side in pixels)")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads and onnxruntime intra-op threads (default: library defaults)")
    args = parser.parse_args()

    import onnxruntime as ort

    from onepass_ovs import Segmenter
    from onepass_ovs.toy import scenes

    if args.threads:
        torch.set_num_threads(args.threads)
    options = ort.SessionOptions()
    if args.threads:
        options.intra_op_num_threads = args.threads
    print(f"CPU: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"onnxruntime {ort.__version__}, torch threads {torch.get_num_threads()}")
    print(f"{'model':<12}{'size':>6}{'torch s':>10}{'ort s':>10}{'torch/ort':>11}")
    vocabulary = list(scenes.CLASS_NAMES)
    for item in args.models.split(","):
        name, _, size = item.partition(":")
        size = int(size or 128)
        if name == "demo":
            seg = Segmenter.from_pretrained("demo", device="cpu")
        else:
            seg = Segmenter.from_config(name, device="cpu", seed=0)
        image = scenes.render_scenes(seed=0, n=1, size=size).images[0]
        with tempfile.TemporaryDirectory() as folder:
            seg.export_onnx(folder)
            onnx_seg = Segmenter.from_onnx(folder, session_options=options)
            # the demo's preprocessing would resize to its short side; time at `size`
            t_torch = timed(
                lambda s=seg, im=image, n=size: s.segment(im, vocabulary, size=n), args.repeat)
            t_ort = timed(
                lambda s=onnx_seg, im=image, n=size: s.segment(im, vocabulary, size=n), args.repeat)
        print(f"{name:<12}{size:>6}{t_torch:>10.4f}{t_ort:>10.4f}{t_torch / t_ort:>10.2f}x")


if __name__ == "__main__":
    main()
