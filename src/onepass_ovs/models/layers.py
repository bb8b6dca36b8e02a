"""Small transformer pieces shared by the proposal generator and CAL."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def sine_position_embedding(
    height: int, width: int, dim: int, *, device=None, dtype=torch.float32,
    temperature: float = 10000.0,
) -> torch.Tensor:
    """DETR's normalised 2-D sine embedding (scale 2*pi) -> (height*width, dim).

    The first dim/2 channels encode y, the last dim/2 encode x, interleaving sin and cos.
    """
    if dim % 4:
        raise ValueError(f"sine position embedding needs dim divisible by 4, got {dim}")
    half = dim // 2
    eps = 1e-6
    scale = 2 * math.pi
    y = torch.arange(1, height + 1, device=device, dtype=torch.float32)
    x = torch.arange(1, width + 1, device=device, dtype=torch.float32)
    y = y / (height + eps) * scale
    x = x / (width + eps) * scale
    dim_t = torch.arange(half, device=device, dtype=torch.float32)
    dim_t = temperature ** (2 * (dim_t // 2) / half)
    pos_y = y[:, None] / dim_t  # (h, half)
    pos_x = x[:, None] / dim_t  # (w, half)
    pos_y = torch.stack((pos_y[:, 0::2].sin(), pos_y[:, 1::2].cos()), dim=2).flatten(1)
    pos_x = torch.stack((pos_x[:, 0::2].sin(), pos_x[:, 1::2].cos()), dim=2).flatten(1)
    pos = torch.cat(
        [pos_y[:, None, :].expand(height, width, half), pos_x[None, :, :].expand(height, width, half)],
        dim=-1,
    )
    return pos.reshape(height * width, dim).to(dtype)


def conv_gn(cin: int, cout: int, kernel: int, groups: int, relu: bool) -> nn.Sequential:
    """Bias-free ``kernel`` x ``kernel`` conv (same padding) + GroupNorm(``groups``),
    + ReLU when ``relu``: (B, cin, H, W) -> (B, cout, H, W)."""
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False),
        nn.GroupNorm(groups, cout),
    ]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class MLP(nn.Module):
    """Linear layers with ReLU between them."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int):
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:], strict=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


class DecoderLayer(nn.Module):
    """DETR decoder layer (post-norm): self-attention, cross-attention, FFN.

    tgt (B, N, C), memory (B, L, C); positions are added to queries and keys only.
    """

    def __init__(self, dim: int, heads: int, ffn_dim: int, dropout: float):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.linear1 = nn.Linear(dim, ffn_dim)
        self.linear2 = nn.Linear(ffn_dim, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, tgt, memory, query_pos, memory_pos):
        q = k = tgt + query_pos
        tgt = self.norm1(tgt + self.dropout(self.self_attn(q, k, tgt, need_weights=False)[0]))
        attended = self.cross_attn(
            tgt + query_pos, memory + memory_pos, memory, need_weights=False
        )[0]
        tgt = self.norm2(tgt + self.dropout(attended))
        ffn = self.linear2(self.dropout(F.relu(self.linear1(tgt))))
        return self.norm3(tgt + self.dropout(ffn))
