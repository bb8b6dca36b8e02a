"""Public ``anchor_pool``: argument checks and the choice of implementation."""

from __future__ import annotations

import torch

from ._backends import check_backend_name, require_triton_for, triton_importable
from ._reference import anchor_pool_dense
from ._torch_anchor_pool import DEFAULT_CHUNK, anchor_pool_chunked

BACKENDS = ("auto", "torch", "triton")
# Head dims the kernels are written for: power-of-two tiles, at most 128 for registers.
TRITON_HEAD_DIMS = (16, 32, 64, 128)
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _check_inputs(q, k, v, gate) -> None:
    names = ("q", "k", "v", "gate")
    for name, tensor in zip(names, (q, k, v, gate), strict=True):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"anchor_pool: {name} must be a torch.Tensor, got {type(tensor)}")
    expected_layouts = (
        ("q", q, "(B, H, N, D)"), ("k", k, "(B, H, L, D)"), ("v", v, "(B, H, L, D)"),
        ("gate", gate, "(B, N, L)"),
    )  # fmt: skip
    for name, tensor, dims in expected_layouts:
        if tensor.dim() != dims.count(",") + 1:
            raise ValueError(f"anchor_pool: {name} must be {dims}, got shape {tuple(tensor.shape)}")
    batch, num_heads, num_queries, head_dim = q.shape
    if k.shape != v.shape:
        raise ValueError(
            f"anchor_pool: k and v must have the same shape (B, H, L, D), got {tuple(k.shape)}"
            f" and {tuple(v.shape)}"
        )
    if k.shape[:2] != (batch, num_heads) or k.shape[3] != head_dim:
        raise ValueError(
            f"anchor_pool: q {tuple(q.shape)} and k {tuple(k.shape)} must agree on B, H and D"
        )
    seq_l = k.shape[2]
    if gate.shape != (batch, num_queries, seq_l):
        raise ValueError(
            f"anchor_pool: gate must be (B, N, L) = {(batch, num_queries, seq_l)}, got"
            f" {tuple(gate.shape)}"
        )
    if seq_l == 0:
        raise ValueError("anchor_pool: L must be at least 1 (softmax over no keys)")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(
            f"anchor_pool: q, k and v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}"
        )
    for name, tensor in zip(names, (q, k, v, gate), strict=True):
        if tensor.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"anchor_pool: {name} must be floating point, got {tensor.dtype}")
    devices = {t.device for t in (q, k, v, gate)}
    if len(devices) != 1:
        raise ValueError(
            f"anchor_pool: all inputs must be on one device, got {sorted(map(str, devices))}"
        )


def _triton_supports(q: torch.Tensor) -> bool:
    return q.shape[-1] in TRITON_HEAD_DIMS and q.dtype in _TRITON_DTYPES and q.numel() > 0


def anchor_pool(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gate: torch.Tensor,
    *,
    scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Gated heatmap pooling (DeOP's CAL pooling), per head.

    ``out[b, h] = (softmax_L(q[b, h] @ k[b, h]^T * scale) * gate[b]) @ v[b, h]``

    The gate multiplies the probabilities after the softmax and the result is not
    renormalised, so a row whose gate is all zero pools to zeros.

    Args:
        q: queries ``(B, H, N, D)``.
        k: keys ``(B, H, L, D)``.
        v: values ``(B, H, L, D)``; same dtype as ``q`` and ``k``.
        gate: ``(B, N, L)``, typically in ``[0, 1]``; shared by the heads, any float dtype.
        scale: logit multiplier; ``D ** -0.5`` when None.
        backend: ``"auto"`` (Triton for CUDA tensors when Triton imports and D is one of
            16, 32, 64, 128 with fp16/bf16/fp32 inputs, else torch), ``"torch"`` (dense up
            to 1024 keys, beyond that chunks of 1024 keys with an online softmax) or
            ``"triton"`` (fused kernels; CUDA tensors, or CPU tensors with
            ``TRITON_INTERPRET=1``).

    Returns:
        ``(B, H, N, D)`` in the dtype of ``q``. Differentiable in ``q``, ``k``, ``v`` and
        ``gate`` on every backend.
    """
    check_backend_name(backend, BACKENDS, "anchor_pool")
    _check_inputs(q, k, v, gate)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    scale = float(scale)

    if backend == "triton":
        require_triton_for(q.device, "anchor_pool")
        if not _triton_supports(q):
            raise ValueError(
                f"anchor_pool: the Triton kernels need D in {TRITON_HEAD_DIMS}, a dtype in"
                f" (float16, bfloat16, float32) and a non-empty q; got D={q.shape[-1]},"
                f" dtype={q.dtype}, shape={tuple(q.shape)}. Use backend='torch'."
            )
    use_triton = backend == "triton" or (
        backend == "auto" and q.is_cuda and _triton_supports(q) and triton_importable()
    )
    if use_triton:
        from ._triton_anchor_pool import anchor_pool_triton

        return anchor_pool_triton(q, k, v, gate, scale)
    if k.shape[2] > DEFAULT_CHUNK:
        # Measured on CPU (docs/kernels.md): beyond one chunk the online-softmax path is
        # as fast as the dense one and its memory does not grow with N * L per head.
        return anchor_pool_chunked(q, k, v, gate, scale, DEFAULT_CHUNK)
    return anchor_pool_dense(q, k, v, gate, scale)
