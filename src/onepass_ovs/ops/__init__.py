"""Fused attention-mask ops of DeOP (docs/methods.md section 1, steps 3 and 5).

* ``anchor_pool(q, k, v, gate)``: CAL heatmap pooling, ``(softmax_L(q k^T) * gate) @ v``
  with the gate applied after the softmax and no renormalisation. Fused Triton kernels
  (online softmax over L, forward and backward) on CUDA; torch on CPU.
* ``mask_guided_attention(m, v)``: mask-guided patch severance,
  ``softmax(m m^T * scale) @ v`` for every head. SDPA (flash / memory-efficient) on CUDA;
  dense torch on CPU.

Importing this package does not import Triton; the kernels load on first use.
See docs/kernels.md for shapes, backends, tolerances and benchmarks.
"""

from ._anchor_pool import anchor_pool
from ._mask_attention import mask_guided_attention

__all__ = ["anchor_pool", "mask_guided_attention"]
