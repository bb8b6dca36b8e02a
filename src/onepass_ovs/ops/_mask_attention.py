"""Public ``mask_guided_attention``: checks, the dense path and the fused SDPA path."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from ._backends import check_backend_name
from ._reference import mask_guided_attention_dense

BACKENDS = ("auto", "torch", "sdpa")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# SDPA's memory-efficient kernel needs q/k/v head dims divisible by its GEMM alignment
# (at most 8 elements, for 16-bit inputs). Zero columns do not change m m^T, so the mask
# dimension is padded up to it.
_SDPA_HEAD_DIM_MULTIPLE = 8


def _check_inputs(m, v) -> None:
    for name, tensor in (("m", m), ("v", v)):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(
                f"mask_guided_attention: {name} must be a torch.Tensor, got {type(tensor)}"
            )
    if m.dim() != 3:
        raise ValueError(f"mask_guided_attention: m must be (B, T, N), got shape {tuple(m.shape)}")
    if v.dim() != 4:
        raise ValueError(
            f"mask_guided_attention: v must be (B, H, T, D), got shape {tuple(v.shape)}"
        )
    if m.shape[0] != v.shape[0] or m.shape[1] != v.shape[2]:
        raise ValueError(
            f"mask_guided_attention: m (B, T, N) = {tuple(m.shape)} and v (B, H, T, D) ="
            f" {tuple(v.shape)} must agree on B and T"
        )
    if m.shape[1] == 0 or m.shape[2] == 0:
        raise ValueError(
            f"mask_guided_attention: T and N must be at least 1, got m of shape {tuple(m.shape)}"
        )
    for name, tensor in (("m", m), ("v", v)):
        if tensor.dtype not in _FLOAT_DTYPES:
            raise TypeError(
                f"mask_guided_attention: {name} must be floating point, got {tensor.dtype}"
            )
    if m.device != v.device:
        raise ValueError(
            f"mask_guided_attention: m and v must be on one device, got {m.device} and {v.device}"
        )


def _fused_kernels_only(device: torch.device):
    """On CUDA, allow only SDPA kernels that never build the (T, T) matrix."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION])


def mask_guided_attention_sdpa(m: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Mask-guided attention through ``F.scaled_dot_product_attention`` with q = k = m.

    The masks are zero-padded to a multiple of 8 columns and expanded over the heads
    (a view, no copy). SDPA then sees q/k head dim N' and value head dim D; when they
    differ, only the memory-efficient kernel applies (flash needs equal dims), which is
    what runs on CUDA. On CPU SDPA picks its own kernel.
    """
    batch, num_heads, num_tokens, _ = v.shape
    mask_dim = m.shape[-1]
    padded_dim = -(-mask_dim // _SDPA_HEAD_DIM_MULTIPLE) * _SDPA_HEAD_DIM_MULTIPLE
    queries = F.pad(m.to(v.dtype), (0, padded_dim - mask_dim))
    queries = queries.unsqueeze(1).expand(batch, num_heads, num_tokens, padded_dim)
    with _fused_kernels_only(v.device):
        return F.scaled_dot_product_attention(queries, queries, v, scale=scale)


def mask_guided_attention(
    m: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float = 1.0,
    backend: str = "auto",
) -> torch.Tensor:
    """Mask-guided patch severance: attention whose logits are mask overlaps.

    ``A = softmax over keys of (m m^T * scale)`` (``(T, T)``, the same for every head) and
    ``out[:, h] = A @ v[:, h]``. In other words attention with ``q = k = m`` and head
    dimension N.

    Args:
        m: per-token soft-mask vectors ``(B, T, N)``; T counts every token (the model
            passes a row of ones for CLS); N is arbitrary (e.g. 100).
        v: values ``(B, H, T, D)``, already split into heads.
        scale: logit multiplier (default 1.0).
        backend: ``"auto"`` (``"sdpa"`` for CUDA tensors, else ``"torch"``), ``"torch"``
            (dense: builds one ``(B, T, T)`` matrix shared by the heads) or ``"sdpa"``
            (``F.scaled_dot_product_attention``; on CUDA restricted to the flash and
            memory-efficient kernels, which never build ``(T, T)``).

    Returns:
        ``(B, H, T, D)`` in the dtype of ``v``. Differentiable in ``m`` and ``v``.
    """
    if backend == "triton":
        # The DeOP model passes one backend name to both ops; say where the fused path is.
        raise ValueError(
            "mask_guided_attention: there is no Triton kernel for this op; its fused path"
            " is SDPA: use backend='auto' (SDPA on CUDA) or backend='sdpa'"
        )
    check_backend_name(backend, BACKENDS, "mask_guided_attention")
    _check_inputs(m, v)
    scale = float(scale)
    fused_dtype = v.dtype in (torch.float16, torch.bfloat16, torch.float32)
    if backend == "sdpa":
        if v.is_cuda and not fused_dtype:
            raise TypeError(
                f"mask_guided_attention: the fused CUDA kernels take float16, bfloat16 or"
                f" float32, got {v.dtype}; use backend='torch'"
            )
        return mask_guided_attention_sdpa(m, v, scale)
    if backend == "auto" and v.is_cuda and fused_dtype:
        return mask_guided_attention_sdpa(m, v, scale)
    return mask_guided_attention_dense(m, v, scale)
