"""Ray Data vs in-process throughput for the same images, model and vocabulary.

    python benchmarks/ray_throughput.py                     # demo, 64 scenes at 128 px
    python benchmarks/ray_throughput.py --num 256 --actors 2 --cpus 4

In-process: one ``Segmenter.segment(images, vocabulary, batch_size=B)`` call over arrays
already in memory. Ray: ``ray.data.from_numpy`` of the same arrays ->
``map_batches(Segment, concurrency=actors)`` -> ``materialize()``, timed from the
dataset's creation to the last batch (actor start-up and model loading included: that is
what a batch job pays), on a local Ray instance with ``--cpus`` CPUs. Each actor runs
``--cpus / --actors`` torch threads but reserves one Ray CPU (reserving all of them
starves Ray's own tasks on a small instance). Prints images/s for both and the
ratio; on a machine with few cores Ray mostly adds overhead (it pays off when there are
more cores or GPUs than one process can use, or many machines).
"""

from __future__ import annotations

import os
import platform
import time

from _common import parser_from_doc


def main() -> None:
    parser = parser_from_doc(__doc__)
    parser.add_argument("--model", default="demo")
    parser.add_argument("--num", type=int, default=64)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--actors", type=int, default=1)
    parser.add_argument("--cpus", type=int, default=2)
    args = parser.parse_args()

    import ray
    import torch

    from onepass_ovs.integrations.ray import Segment, load_segmenter
    from onepass_ovs.toy import scenes

    threads = max(1, args.cpus // args.actors)
    torch.set_num_threads(threads)
    images = scenes.render_scenes(seed=0, n=args.num, size=args.size).images
    vocabulary = list(scenes.CLASS_NAMES)
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores visible; "
          f"{args.num} images {args.size} px, model {args.model}, batch {args.batch_size}")

    start = time.perf_counter()
    seg = load_segmenter(args.model, device="cpu")
    seg.segment(list(images), vocabulary, batch_size=args.batch_size)
    in_process = time.perf_counter() - start
    print(f"in-process ({torch.get_num_threads()} threads, model load included): "
          f"{in_process:.2f} s, {args.num / in_process:.1f} images/s")

    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False

        class ThreadedSegment(Segment):
            def __init__(self, *a, **k):
                torch.set_num_threads(threads)
                super().__init__(*a, **k)

        start = time.perf_counter()
        ds = ray.data.from_numpy(images).rename_columns({"data": "image"})
        ds = ds.map_batches(
            ThreadedSegment,
            fn_constructor_kwargs={"model": args.model, "vocabulary": vocabulary,
                                   "device": "cpu", "batch_size": args.batch_size},
            batch_size=args.batch_size, concurrency=args.actors, num_cpus=1,
        ).materialize()
        with_ray = time.perf_counter() - start
        assert ds.count() == args.num
    finally:
        ray.shutdown()
    print(f"ray ({args.actors} actor(s) x {threads} threads, start-up included): "
          f"{with_ray:.2f} s, {args.num / with_ray:.1f} images/s")
    print(f"ray / in-process throughput: {in_process / with_ray:.2f}x")


if __name__ == "__main__":
    main()
