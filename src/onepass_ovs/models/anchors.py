"""Classification anchor learning (CAL): pool CLIP patch features into one vector per proposal.

A one-layer DETR decoder turns N learned query positions (query n tied to proposal n)
into anchors that attend over the dense CLIP features; an output layer (self-attention +
add & norm) lets anchors see each other; then *heatmap pooling* per head h:

    A_h = softmax over L of (Wq_h q)(Wk_h k)^T / sqrt(d)        (N, L)
    A_h = dropout(A_h)   in training only (the reference's attention dropout, 0.1)
    H_h = A_h * G        with G = bilinear(sigmoid(M)) to the grid; NOT renormalised
    pooled_h = H_h @ F[:, h*d:(h+1)*d]

No value or output projection: the pooled vector stays in CLIP's embedding space, so text
embeddings still classify it. The pooling runs through :func:`onepass_ovs.ops.anchor_pool`
(fused online-softmax kernel on CUDA).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import anchor_pool
from .layers import DecoderLayer, sine_position_embedding


@dataclass
class AnchorConfig:
    """Classification anchor learning (CAL): decoder + heatmap pooling."""

    num_heads: int = 8
    dim_feedforward: int = 1024
    # dropout of the decoder layers and of the pooling attention (before the gate)
    dropout: float = 0.1
    # "cal": learned anchors + heatmap pooling; "mask_average": average of CLIP features
    # inside each soft mask (an ablation / training-free fallback).
    pooling: str = "cal"
    logit_scale: float = 100.0

    def __post_init__(self) -> None:
        if self.pooling not in ("cal", "mask_average"):
            raise ValueError(f"unknown pooling {self.pooling!r}; use 'cal' or 'mask_average'")


def proposal_gate(mask_logits: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(B, N, h', w') mask logits -> (B, N, h*w) soft masks on the CLIP grid.

    CAL's order: sigmoid first, then bilinear resize (the opposite of severance's order).
    """
    gate = F.interpolate(mask_logits.float().sigmoid(), size=grid, mode="bilinear", align_corners=False)
    return gate.flatten(2)


def mask_average_pool(dense: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """Average of dense features inside each soft mask: (B, L, E), (B, N, L) -> (B, N, E)."""
    weights = gate / gate.sum(-1, keepdim=True).clamp_min(1e-6)
    return F.normalize(weights @ dense, dim=-1)


class AnchorPooling(nn.Module):
    """CAL decoder + heatmap pooling.

    Args:
        dim: CLIP embedding dimension E (must be divisible by ``num_heads``).
        num_queries: N, the number of proposals.
        pooling: ``"cal"`` or ``"mask_average"`` (ablation: no learned anchors).

    ``forward(dense, grid, mask_logits)``: dense (B, L, E) normalised CLIP features on an
    (h, w) grid, mask logits (B, N, h', w') -> pooled (B, N, E), L2-normalised.
    """

    def __init__(
        self,
        dim: int,
        num_queries: int,
        *,
        num_heads: int = 8,
        dim_feedforward: int = 1024,
        dropout: float = 0.1,
        pooling: str = "cal",
    ):
        super().__init__()
        if pooling not in ("cal", "mask_average"):
            raise ValueError(f"unknown pooling {pooling!r}; use 'cal' or 'mask_average'")
        if dim % num_heads:
            raise ValueError(f"embedding dim {dim} is not divisible by {num_heads} heads")
        self.pooling = pooling
        self.num_heads = num_heads
        self.dim = dim
        if pooling == "cal":
            self.query_pos = nn.Embedding(num_queries, dim)
            self.decoder = DecoderLayer(dim, num_heads, dim_feedforward, dropout)
            self.out_attn = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)
            self.out_norm = nn.LayerNorm(dim)
            self.dropout = nn.Dropout(dropout)
            self.attention_dropout = dropout
            self.q_proj = nn.Linear(dim, dim)
            self.k_proj = nn.Linear(dim, dim)

    def forward(
        self, dense: torch.Tensor, grid: tuple[int, int], mask_logits: torch.Tensor
    ) -> torch.Tensor:
        gate = proposal_gate(mask_logits, grid)
        if self.pooling == "mask_average":
            return mask_average_pool(dense, gate)
        b, n = gate.shape[:2]
        if n != self.query_pos.num_embeddings:
            raise ValueError(f"CAL has {self.query_pos.num_embeddings} anchors but got {n} proposals")
        dtype = self.q_proj.weight.dtype
        dense = dense.to(dtype)
        pos = sine_position_embedding(*grid, self.dim, device=dense.device, dtype=dtype)
        query_pos = self.query_pos.weight.unsqueeze(0).expand(b, -1, -1)
        anchors = self.decoder(torch.zeros_like(query_pos), dense, query_pos, pos)
        q = anchors + query_pos
        mixed = self.out_attn(q, q, anchors, need_weights=False)[0]
        anchors = self.out_norm(anchors + self.dropout(mixed))

        heads = self.num_heads
        qh = self.q_proj(anchors + query_pos).unflatten(-1, (heads, -1)).transpose(1, 2)
        kh = self.k_proj(dense + pos).unflatten(-1, (heads, -1)).transpose(1, 2)
        vh = dense.unflatten(-1, (heads, -1)).transpose(1, 2)  # values = raw CLIP features
        # under autocast the projections come out in the autocast dtype: match them
        work = qh.dtype
        if self.training and self.attention_dropout > 0:
            # dropout sits between the softmax and the gate, where the fused kernel cannot
            # reach: training takes the explicit (B, heads, N, L) path
            scale = qh.shape[-1] ** -0.5
            attention = (qh @ kh.to(work).transpose(-1, -2) * scale).float().softmax(-1)
            attention = F.dropout(attention, self.attention_dropout, training=True)
            heatmap = (attention * gate[:, None].float()).to(work)
            pooled = heatmap @ vh.to(work)
        else:
            pooled = anchor_pool(qh, kh.to(work), vh.to(work), gate.to(work))  # (B, heads, N, d)
        return F.normalize(pooled.transpose(1, 2).flatten(2).float(), dim=-1)
