"""Dense torch formulas of the ops: the CPU path and the reference the fused paths match.

Both functions materialise the full attention matrix and let autograd differentiate
through plain torch ops. Half-precision inputs are multiplied in their own dtype (the
matmuls accumulate in fp32 on every device torch supports), while the softmax runs in
fp32 (fp64 for fp64 inputs), which is what the fused kernels do too.
"""

from __future__ import annotations

import torch


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for half inputs, the input dtype for fp32 and fp64 (gradcheck, references)."""
    return torch.promote_types(dtype, torch.float32)


def anchor_pool_dense(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gate: torch.Tensor, scale: float
) -> torch.Tensor:
    """Gated heatmap pooling, dense: ``(softmax_L(q k^T * scale) * gate) @ v``.

    Args:
        q: queries ``(B, H, N, D)``.
        k: keys ``(B, H, L, D)``.
        v: values ``(B, H, L, D)``.
        gate: ``(B, N, L)``, shared by the heads.
        scale: multiplies the logits.

    Returns:
        ``(B, H, N, D)`` in the dtype of ``v``. Materialises ``(B, H, N, L)``.
    """
    logits = torch.matmul(q, k.transpose(-1, -2)) * scale
    acc = accumulation_dtype(logits.dtype)
    probs = torch.softmax(logits, dim=-1, dtype=acc)
    # The gate multiplies after the softmax and the result is NOT renormalised.
    heatmap = probs * gate.unsqueeze(1).to(acc)
    return torch.matmul(heatmap.to(v.dtype), v)


def mask_guided_attention_dense(m: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Mask-guided attention, dense: ``softmax_keys(m m^T * scale) @ v`` for every head.

    Args:
        m: per-token mask vectors ``(B, T, N)``.
        v: values ``(B, H, T, D)``.
        scale: multiplies the logits.

    Returns:
        ``(B, H, T, D)`` in the dtype of ``v``. Materialises one ``(B, T, T)`` matrix,
        shared by the heads.
    """
    batch, num_heads, num_tokens, head_dim = v.shape
    m = m.to(v.dtype)
    logits = torch.matmul(m, m.transpose(-1, -2)) * scale
    attn = torch.softmax(logits, dim=-1, dtype=accumulation_dtype(logits.dtype)).to(v.dtype)
    # The attention matrix is the same for every head, so the heads are folded into the
    # value columns: one (T, T) @ (T, H*D) product instead of H broadcast copies of it.
    values = v.permute(0, 2, 1, 3).reshape(batch, num_tokens, num_heads * head_dim)
    out = torch.matmul(attn, values)
    return out.reshape(batch, num_tokens, num_heads, head_dim).permute(0, 2, 1, 3)
