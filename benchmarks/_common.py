"""Helpers the benchmark scripts share (they import it as ``_common``: a script's own
folder is first on ``sys.path`` when it runs as ``python benchmarks/<name>.py``)."""

from __future__ import annotations

import argparse
import resource
import statistics
import time
from pathlib import Path


def parser_from_doc(doc: str) -> argparse.ArgumentParser:
    """An argument parser whose ``--help`` prints the script's docstring as written."""
    return argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)


def add_speed_arguments(parser: argparse.ArgumentParser) -> None:
    """The options every side-by-side speed script takes: --size, --classes, --repeat,
    --threads, --device."""
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--classes", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu")


def timed(fn, repeat: int) -> float:
    """Median wall time of ``repeat`` calls of ``fn()`` in seconds, after one warm-up call
    (allocations, caches, text cache, ORT graph optimisation)."""
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MiB (VmHWM; ru_maxrss as a fallback)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def normalised_pass(module, batch, mean, std):
    """A no-argument function running ``module(normalise(batch, mean, std))`` under
    ``torch.inference_mode`` (batch: (B, 3, H, W) in [0, 1]), for :func:`timed`."""
    import torch

    from onepass_ovs.models.preprocessing import normalise

    @torch.inference_mode()
    def run() -> None:
        module(normalise(batch, mean, std, None))

    return run
