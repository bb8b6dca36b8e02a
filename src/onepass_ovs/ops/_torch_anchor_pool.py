"""``anchor_pool`` in torch, one chunk of L at a time: the fused algorithm without Triton.

The forward keeps a running max, denominator and gated numerator per query row (online
softmax), so only ``(B, H, N, chunk)`` logits exist at a time. The backward recomputes
the probabilities chunk by chunk from the saved log-sum-exp. This is the memory-bounded
path for large L on CPU, and a second, Triton-free implementation of the backward the
kernels use.

Backward of ``out = (P * G) V`` with ``P = softmax(S)``, ``S = q k^T * scale``, per head,
``dO`` the gradient of ``out`` and ``dH = dO V^T``:

* ``dV = (P * G)^T dO``
* ``dG = sum over heads of P * dH`` (the gate is shared by the heads)
* ``dP = G * dH`` and ``dS = P * (dP - rowsum(P * dP))``, where
  ``rowsum(P * dP) = sum_l P G dH = sum_d dO * out`` (call it ``delta``), so the row
  term needs neither a second pass nor the full ``P``.
* ``dq = dS k * scale``, ``dk = dS^T q * scale``.
"""

from __future__ import annotations

import torch

from ._reference import accumulation_dtype

DEFAULT_CHUNK = 1024


def _chunk_bounds(length: int, chunk: int) -> list[tuple[int, int]]:
    return [(start, min(start + chunk, length)) for start in range(0, length, chunk)]


def _forward(q_acc, k, v, gate, scale: float, chunk: int):
    """Returns the output ``(B, H, N, D)`` and log-sum-exp ``(B, H, N)`` in q_acc's dtype."""
    acc = q_acc.dtype
    batch, num_heads, num_queries, _ = q_acc.shape
    row_max = q_acc.new_full((batch, num_heads, num_queries), float("-inf"))
    denom = q_acc.new_zeros((batch, num_heads, num_queries))
    numer = q_acc.new_zeros((batch, num_heads, num_queries, v.shape[-1]))
    for start, end in _chunk_bounds(k.shape[2], chunk):
        k_chunk = k[:, :, start:end].to(acc)
        logits = torch.matmul(q_acc, k_chunk.transpose(-1, -2)) * scale
        new_max = torch.maximum(row_max, logits.amax(dim=-1))
        # exp(-inf - finite) = 0 on the first chunk, so no special case is needed.
        rescale = torch.exp(row_max - new_max)
        probs = torch.exp(logits - new_max.unsqueeze(-1))
        denom = denom * rescale + probs.sum(dim=-1)
        gated = probs * gate[:, None, :, start:end].to(acc)
        numer = numer * rescale.unsqueeze(-1) + torch.matmul(gated, v[:, :, start:end].to(acc))
        row_max = new_max
    out = numer / denom.unsqueeze(-1)
    return out, row_max + torch.log(denom)


class ChunkedAnchorPool(torch.autograd.Function):
    """Autograd function of the chunked torch path; see the module docstring."""

    @staticmethod
    def forward(ctx, q, k, v, gate, scale: float, chunk: int):
        out_acc, lse = _forward(q.to(accumulation_dtype(q.dtype)), k, v, gate, scale, chunk)
        out = out_acc.to(v.dtype)
        ctx.save_for_backward(q, k, v, gate, out_acc, lse)
        ctx.scale = scale
        ctx.chunk = chunk
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, gate, out_acc, lse = ctx.saved_tensors
        scale, chunk = ctx.scale, ctx.chunk
        need_q, need_k, need_v, need_gate = ctx.needs_input_grad[:4]
        acc = out_acc.dtype
        q_acc = q.to(acc)
        grad_out_acc = grad_out.to(acc)
        # delta = rowsum(P * dP) = sum_d dO * out (see the module docstring).
        delta = (grad_out_acc * out_acc).sum(dim=-1, keepdim=True)
        grad_q = torch.zeros_like(q_acc) if need_q else None
        # Plain contiguous buffers: the inputs may be broadcast views (stride 0).
        grad_k = k.new_empty(k.shape) if need_k else None
        grad_v = v.new_empty(v.shape) if need_v else None
        grad_gate = gate.new_empty(gate.shape) if need_gate else None
        for start, end in _chunk_bounds(k.shape[2], chunk):
            k_chunk = k[:, :, start:end].to(acc)
            v_chunk = v[:, :, start:end].to(acc)
            gate_chunk = gate[:, None, :, start:end].to(acc)
            logits = torch.matmul(q_acc, k_chunk.transpose(-1, -2)) * scale
            probs = torch.exp(logits - lse.unsqueeze(-1))
            grad_heat = torch.matmul(grad_out_acc, v_chunk.transpose(-1, -2))
            if need_gate:
                grad_gate[:, :, start:end] = (probs * grad_heat).sum(dim=1).to(gate.dtype)
            if need_v:
                gated = probs * gate_chunk
                grad_v[:, :, start:end] = torch.matmul(gated.transpose(-1, -2), grad_out_acc).to(
                    v.dtype
                )
            grad_logits = probs * (gate_chunk * grad_heat - delta)
            if need_k:
                grad_k[:, :, start:end] = (
                    torch.matmul(grad_logits.transpose(-1, -2), q_acc) * scale
                ).to(k.dtype)
            if need_q:
                grad_q += torch.matmul(grad_logits, k_chunk) * scale
        if need_q:
            grad_q = grad_q.to(q.dtype)
        return grad_q, grad_k, grad_v, grad_gate, None, None


def anchor_pool_chunked(q, k, v, gate, scale: float, chunk: int = DEFAULT_CHUNK) -> torch.Tensor:
    """``anchor_pool`` over chunks of ``chunk`` keys; same shapes as ``anchor_pool_dense``."""
    return ChunkedAnchorPool.apply(q, k, v, gate, scale, chunk)
