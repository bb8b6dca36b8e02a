"""Independent float64 references and input makers for the tests of ``onepass_ovs.ops``.

The references are written from the formulas, with an explicit max-subtracted softmax,
and share no code with the library.
"""

from __future__ import annotations

import torch


def softmax_last_dim(logits: torch.Tensor) -> torch.Tensor:
    shifted = logits - logits.max(dim=-1, keepdim=True).values
    weights = shifted.exp()
    return weights / weights.sum(dim=-1, keepdim=True)


def reference_anchor_pool(q, k, v, gate, scale):
    """float64 ``(softmax_L(q k^T * scale) * gate) @ v``; q (B,H,N,D), gate (B,N,L)."""
    q, k, v, gate = (t.double() for t in (q, k, v, gate))
    probs = softmax_last_dim(torch.einsum("bhnd,bhld->bhnl", q, k) * scale)
    return torch.einsum("bhnl,bhld->bhnd", probs * gate[:, None], v)


def reference_mask_attention(m, v, scale):
    """float64 ``softmax_keys(m m^T * scale) @ v`` per head; m (B,T,N), v (B,H,T,D)."""
    m, v = m.double(), v.double()
    attn = softmax_last_dim(torch.einsum("btn,bsn->bts", m, m) * scale)
    return torch.einsum("bts,bhsd->bhtd", attn, v)


def reference_grads(fn, inputs, grad_out):
    """Output and gradients of the float64 reference ``fn`` at ``inputs``."""
    leaves = [t.detach().double().requires_grad_(True) for t in inputs]
    out = fn(*leaves)
    grads = torch.autograd.grad(out, leaves, grad_out.double())
    return out.detach(), grads


def make_anchor_inputs(
    batch, heads, queries, keys, head_dim, dtype=torch.float32, seed=0, logit_gain=1.0
):
    """q, k, v, gate with gradients enabled; gate uniform in [0, 1]."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, queries, head_dim, generator=gen) * logit_gain
    k = torch.randn(batch, heads, keys, head_dim, generator=gen)
    v = torch.randn(batch, heads, keys, head_dim, generator=gen)
    gate = torch.rand(batch, queries, keys, generator=gen)
    return [t.to(dtype).requires_grad_(True) for t in (q, k, v, gate)]


# Error bounds, relative to the largest reference value, for outputs and gradients
# against the float64 reference computed from the same (rounded) inputs. About 2-3x the
# worst error measured over several seeds and shapes (docs/kernels.md).
TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-10, torch.float16: 5e-3, torch.bfloat16: 4e-2}


def max_relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected|, or the absolute error when expected is ~0.

    Expected float64. A reference that is exactly zero (e.g. the query gradient when L = 1,
    where the softmax is constant) is compared in absolute terms.
    """
    largest = float(expected.detach().abs().max())
    scale = largest if largest > 1e-6 else 1.0
    return float((actual.detach().double() - expected.detach()).abs().max()) / scale
