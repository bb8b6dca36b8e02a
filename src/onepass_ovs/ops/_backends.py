"""Backend selection shared by the ops: which implementation runs for given tensors.

Triton is an optional dependency and is imported here only when a Triton backend is
asked for or probed, never at ``import onepass_ovs.ops`` time.
"""

from __future__ import annotations

import functools
import os

import torch

_TRUE_STRINGS = ("1", "true", "on", "yes")


@functools.cache
def triton_importable() -> bool:
    """Whether ``import triton`` succeeds (cached: the answer cannot change in a process)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _interpret_requested() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in _TRUE_STRINGS


def triton_interpreter_enabled() -> bool:
    """Whether Triton kernels run in its CPU interpreter in this process.

    Triton 3.x fixes the mode when it wraps a function with ``@triton.jit``, reading
    ``TRITON_INTERPRET`` at that moment, and it wraps its own library functions
    (``tl.sum``, ``tl.max``, ...) when ``triton.language`` is imported. Kernels and
    library must agree, so the mode is decided by the environment at the first
    ``import triton`` of the process; this reads it back from the library itself.
    """
    if not triton_importable():
        return False
    import triton.language.standard as tl_standard

    return type(tl_standard.sum).__name__ == "InterpretedFunction"


def check_backend_name(backend: str, allowed: tuple[str, ...], op_name: str) -> None:
    if backend not in allowed:
        raise ValueError(
            f"{op_name}: unknown backend {backend!r}; expected one of {', '.join(allowed)}"
        )


def require_triton_for(device: torch.device, op_name: str) -> None:
    """Raise a clear error when the Triton backend cannot run on ``device``."""
    if not triton_importable():
        raise RuntimeError(
            f"{op_name}: backend='triton' needs the 'triton' package, which is not importable;"
            " install it or use backend='torch'"
        )
    if device.type == "cuda":
        return
    if device.type == "cpu" and triton_interpreter_enabled():
        return
    if device.type == "cpu" and _interpret_requested():
        raise RuntimeError(
            f"{op_name}: TRITON_INTERPRET=1 is set but triton was imported before it was, in"
            " compiled mode; Triton fixes the mode at import, so set the variable before the"
            " process imports triton (e.g. `TRITON_INTERPRET=1 pytest ...`)"
        )
    hint = (
        " (or run the kernels in Triton's CPU interpreter, slow and meant for tests, by"
        " setting TRITON_INTERPRET=1 before triton is imported)"
        if device.type == "cpu"
        else ""
    )
    raise RuntimeError(
        f"{op_name}: backend='triton' needs CUDA tensors, got tensors on {device}{hint};"
        " use backend='torch' or backend='auto' instead"
    )
