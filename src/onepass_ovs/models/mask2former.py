"""Mask2Former building blocks in pure PyTorch (no compiled op).

- :func:`multi_scale_deformable_attention`: the sampling core of Deformable DETR's
  multi-scale deformable attention, through ``F.grid_sample`` (bilinear, zero outside).
- :class:`MultiScaleDeformableAttention`: the attention module (offsets and weights
  predicted from the query).
- :class:`DeformablePixelDecoder`: a deformable-attention encoder over the stride-8/16/32
  backbone features, then an FPN step to stride-4 mask features (GroupNorm throughout).
- :class:`MaskedAttentionDecoder`: learnable queries cross-attend to one feature level per
  layer (round robin, coarsest first), each query restricted to the foreground of its
  previous mask prediction; predictions from the learnable queries and after every layer.

These are generic: they know nothing of text or classes. A family adds its own class head
on the decoder's normalised queries (GKC: :mod:`onepass_ovs.models.gkc`).

Conventions: feature maps (B, C, h, w); flattened multi-scale tensors (B, S, C) with
S = sum_l h_l * w_l, levels concatenated in the order given; sampling locations
normalised to [0, 1] with (x, y) order, 0 and 1 the outer edges of the map (pixel i's
centre at (i + 0.5) / w), as Deformable DETR.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .layers import MLP, conv_gn, sine_position_embedding

# -- deformable attention -------------------------------------------------------------------------


def multi_scale_deformable_attention(
    value: torch.Tensor,
    spatial_shapes: Sequence[tuple[int, int]],
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Weighted sum of bilinear samples of each level's value map.

    Args:
        value: (B, S, heads, d), the levels' maps flattened row-major and concatenated.
        spatial_shapes: (h_l, w_l) of each of the L levels; sum h_l * w_l == S.
        sampling_locations: (B, Q, heads, L, P, 2) in [0, 1], (x, y) order.
        attention_weights: (B, Q, heads, L, P).

    Returns:
        (B, Q, heads * d): out[b, q, h] = sum_{l, p} w[b, q, h, l, p] *
        bilinear(value_l[b, :, h], loc[b, q, h, l, p]); samples outside the map read 0.
    """
    b, s, heads, d = value.shape
    _, q, _, levels, points, _ = sampling_locations.shape
    sizes = [int(h) * int(w) for h, w in spatial_shapes]
    if sum(sizes) != s:
        raise ValueError(f"spatial_shapes {list(spatial_shapes)} cover {sum(sizes)} positions, value has {s}")
    if len(sizes) != levels:
        raise ValueError(f"{len(sizes)} spatial shapes for {levels} sampling levels")
    grids = 2 * sampling_locations - 1  # grid_sample's [-1, 1]
    # (B, Q, heads, L, P) -> (B*heads, 1, Q, L, P)
    weights = attention_weights.transpose(1, 2).reshape(b * heads, 1, q, levels, points)
    out = None
    for level, (value_l, (h, w)) in enumerate(zip(value.split(sizes, dim=1), spatial_shapes, strict=True)):
        # (B, h*w, heads, d) -> (B*heads, d, h, w)
        value_l = value_l.permute(0, 2, 3, 1).reshape(b * heads, d, int(h), int(w))
        # (B, Q, heads, P, 2) -> (B*heads, Q, P, 2)
        grid = grids[:, :, :, level].transpose(1, 2).reshape(b * heads, q, points, 2)
        sampled = F.grid_sample(value_l, grid.to(value_l.dtype), mode="bilinear",
                                padding_mode="zeros", align_corners=False)  # (B*heads, d, Q, P)
        term = (sampled * weights[..., level, :].to(sampled.dtype)).sum(-1)  # (B*heads, d, Q)
        out = term if out is None else out + term
    return out.view(b, heads * d, q).transpose(1, 2)


class MultiScaleDeformableAttention(nn.Module):
    """Deformable attention over L feature levels (Deformable DETR), pure PyTorch.

    Each query predicts, per head, ``points`` sampling offsets per level around its
    reference point and softmax weights over the ``levels * points`` samples.

    ``forward(query (B, Q, C), reference_points (B, Q, L, 2) in [0, 1], value_input
    (B, S, C), spatial_shapes [(h_l, w_l)], padding_mask (B, S) bool or None)`` ->
    (B, Q, C). Offsets are in units of each level's own pixels.
    """

    def __init__(self, dim: int = 256, levels: int = 4, heads: int = 8, points: int = 4):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.dim, self.levels, self.heads, self.points = dim, levels, heads, points
        self.sampling_offsets = nn.Linear(dim, heads * levels * points * 2)
        self.attention_weights = nn.Linear(dim, heads * levels * points)
        self.value_proj = nn.Linear(dim, dim)
        self.output_proj = nn.Linear(dim, dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # zero offset weights; biases put head h's points on a ray at angle 2*pi*h/heads,
        # point p at distance p + 1 (in level pixels): the initial pattern is a star
        nn.init.zeros_(self.sampling_offsets.weight)
        angles = torch.arange(self.heads, dtype=torch.float32) * (2 * math.pi / self.heads)
        directions = torch.stack([angles.cos(), angles.sin()], -1)
        directions = directions / directions.abs().max(-1, keepdim=True).values
        bias = directions.view(self.heads, 1, 1, 2).repeat(1, self.levels, self.points, 1)
        bias = bias * torch.arange(1, self.points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(bias.flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def forward(
        self,
        query: torch.Tensor,
        reference_points: torch.Tensor,
        value_input: torch.Tensor,
        spatial_shapes: Sequence[tuple[int, int]],
        padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        b, q, _ = query.shape
        value = self.value_proj(value_input)
        if padding_mask is not None:
            value = value.masked_fill(padding_mask[..., None], 0.0)
        value = value.view(b, value.shape[1], self.heads, self.dim // self.heads)
        offsets = self.sampling_offsets(query).view(b, q, self.heads, self.levels, self.points, 2)
        weights = self.attention_weights(query).view(b, q, self.heads, self.levels * self.points)
        weights = weights.softmax(-1).view(b, q, self.heads, self.levels, self.points)
        # offsets in level pixels -> normalised units: divide by (w_l, h_l)
        normaliser = torch.tensor(
            [[w, h] for h, w in spatial_shapes], dtype=offsets.dtype, device=offsets.device
        )
        locations = (
            reference_points[:, :, None, :, None, :]
            + offsets / normaliser[None, None, None, :, None, :]
        )
        out = multi_scale_deformable_attention(value, spatial_shapes, locations, weights)
        return self.output_proj(out)


# -- pixel decoder --------------------------------------------------------------------------------


def _position_map(h: int, w: int, dim: int, like: torch.Tensor) -> torch.Tensor:
    """DETR's normalised sine embedding as (1, h*w, dim)."""
    return sine_position_embedding(h, w, dim, device=like.device, dtype=like.dtype)[None]


class DeformableEncoderLayer(nn.Module):
    """Post-norm encoder layer: deformable self-attention over all levels, then an FFN."""

    def __init__(self, dim: int, levels: int, heads: int, points: int, ffn_dim: int, dropout: float):
        super().__init__()
        self.self_attn = MultiScaleDeformableAttention(dim, levels, heads, points)
        self.norm1 = nn.LayerNorm(dim)
        self.linear1 = nn.Linear(dim, ffn_dim)
        self.linear2 = nn.Linear(ffn_dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, src, pos, reference_points, spatial_shapes, padding_mask=None):
        attended = self.self_attn(src + pos, reference_points, src, spatial_shapes, padding_mask)
        src = self.norm1(src + self.dropout(attended))
        ffn = self.linear2(self.dropout(F.relu(self.linear1(src))))
        return self.norm2(src + self.dropout(ffn))


def encoder_reference_points(spatial_shapes: Sequence[tuple[int, int]], levels: int, device, dtype):
    """Pixel centres of every level, normalised, repeated for each sampled level:
    (1, S, levels, 2) in (x, y) order."""
    points = []
    for h, w in spatial_shapes:
        y = (torch.arange(h, device=device, dtype=dtype) + 0.5) / h
        x = (torch.arange(w, device=device, dtype=dtype) + 0.5) / w
        yy, xx = torch.meshgrid(y, x, indexing="ij")
        points.append(torch.stack([xx.flatten(), yy.flatten()], -1))
    ref = torch.cat(points, 0)  # (S, 2)
    return ref[None, :, None, :].expand(1, -1, levels, -1)


class DeformablePixelDecoder(nn.Module):
    """Mask2Former's pixel decoder: deformable encoder + FPN to stride-4 mask features.

    Args:
        in_channels: channels of the backbone features, finest first (strides 4, 8, 16,
            32 for the usual four).
        dim: width of the encoder and the FPN (256 in the paper).
        mask_dim: channels of the mask features.
        encoder_levels: how many of the coarsest features the deformable encoder reads
            (3: strides 8/16/32); the finer ones join through FPN lateral convs.
        encoder_layers, heads, points, ffn_dim, dropout: the encoder's geometry.
        norm_groups: GroupNorm groups.

    ``forward(features)`` with features [(B, C_i, H/s_i, W/s_i)] finest first returns
    ``(mask_features (B, mask_dim, H/s_0, W/s_0), multi_scale [(B, dim, h, w)] coarsest
    first, encoder_levels of them)``.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        *,
        dim: int = 256,
        mask_dim: int = 256,
        encoder_levels: int = 3,
        encoder_layers: int = 6,
        heads: int = 8,
        points: int = 4,
        ffn_dim: int = 1024,
        dropout: float = 0.0,
        norm_groups: int = 32,
    ):
        super().__init__()
        in_channels = [int(c) for c in in_channels]
        if not 1 <= encoder_levels <= len(in_channels):
            raise ValueError(f"encoder_levels must be in [1, {len(in_channels)}], got {encoder_levels}")
        self.dim = dim
        self.encoder_levels = encoder_levels
        # encoder inputs, coarsest first
        encoder_channels = in_channels[len(in_channels) - encoder_levels:][::-1]
        self.input_proj = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, dim, 1), nn.GroupNorm(norm_groups, dim)) for c in encoder_channels
        )
        for proj in self.input_proj:
            nn.init.xavier_uniform_(proj[0].weight, gain=1)
            nn.init.zeros_(proj[0].bias)
        self.level_embed = nn.Parameter(torch.randn(encoder_levels, dim) * dim**-0.5)
        self.encoder = nn.ModuleList(
            DeformableEncoderLayer(dim, encoder_levels, heads, points, ffn_dim, dropout)
            for _ in range(encoder_layers)
        )
        # FPN for the finer features, coarsest of them first
        fpn_channels = in_channels[: len(in_channels) - encoder_levels][::-1]
        self.lateral = nn.ModuleList(conv_gn(c, dim, 1, norm_groups, False) for c in fpn_channels)
        self.output = nn.ModuleList(conv_gn(dim, dim, 3, norm_groups, True) for _ in fpn_channels)
        self.mask_features = nn.Conv2d(dim, mask_dim, 1)

    def forward(self, features: Sequence[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        n_fpn = len(features) - self.encoder_levels
        inputs = list(features[n_fpn:])[::-1]  # coarsest first
        maps = [proj(x) for proj, x in zip(self.input_proj, inputs, strict=True)]
        shapes = [tuple(m.shape[-2:]) for m in maps]
        b = maps[0].shape[0]
        src = torch.cat([m.flatten(2).transpose(1, 2) for m in maps], 1)  # (B, S, dim)
        pos = torch.cat(
            [_position_map(h, w, self.dim, src) + self.level_embed[i].to(src.dtype)
             for i, (h, w) in enumerate(shapes)],
            1,
        )
        ref = encoder_reference_points(shapes, self.encoder_levels, src.device, src.dtype)
        ref = ref.expand(b, -1, -1, -1)
        for layer in self.encoder:
            src = layer(src, pos, ref, shapes)
        sizes = [h * w for h, w in shapes]
        multi_scale = [
            part.transpose(1, 2).reshape(b, self.dim, h, w)
            for part, (h, w) in zip(src.split(sizes, 1), shapes, strict=True)
        ]
        y = multi_scale[-1]  # finest encoder level
        finer = list(features[:n_fpn])[::-1]
        for lateral, output, x in zip(self.lateral, self.output, finer, strict=True):
            x = lateral(x)
            y = output(x + F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False))
        return self.mask_features(y), multi_scale


# -- masked-attention transformer decoder ---------------------------------------------------------


class MaskedDecoderLayer(nn.Module):
    """Mask2Former decoder layer (post-norm): masked cross-attention, self-attention, FFN.

    queries (B, N, C), memory (B, L, C); positions are added to queries and keys only;
    ``attn_mask`` (B * heads, N, L) bool, True = not attended.
    """

    def __init__(self, dim: int, heads: int, ffn_dim: int, dropout: float):
        super().__init__()
        self.cross_attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.norm1 = nn.LayerNorm(dim)
        self.self_attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.linear1 = nn.Linear(dim, ffn_dim)
        self.linear2 = nn.Linear(ffn_dim, dim)
        self.norm3 = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, tgt, memory, query_pos, memory_pos, attn_mask=None):
        attended = self.cross_attn(
            tgt + query_pos, memory + memory_pos, memory, attn_mask=attn_mask, need_weights=False
        )[0]
        tgt = self.norm1(tgt + self.dropout(attended))
        q = k = tgt + query_pos
        tgt = self.norm2(tgt + self.dropout(self.self_attn(q, k, tgt, need_weights=False)[0]))
        ffn = self.linear2(self.dropout(F.relu(self.linear1(tgt))))
        return self.norm3(tgt + self.dropout(ffn))


class MaskedAttentionDecoder(nn.Module):
    """Mask2Former's transformer decoder with masked attention.

    Args:
        dim: query width (256); every feature level must have ``dim`` channels.
        num_queries, heads, ffn_dim, layers, dropout: the geometry (100, 8, 2048, 9, 0).
        mask_dim: channels of the mask features.
        levels: feature levels read round robin (3).

    ``forward(multi_scale [(B, dim, h_l, w_l)] coarsest first, mask_features (B, mask_dim,
    h, w))`` -> a list of ``layers + 1`` predictions, the first from the learnable queries
    alone, then one after every layer; each a dict with ``queries`` (B, N, dim) (after the
    shared LayerNorm; class heads read these) and ``mask_logits`` (B, N, h, w).
    """

    def __init__(
        self,
        *,
        dim: int = 256,
        num_queries: int = 100,
        heads: int = 8,
        ffn_dim: int = 2048,
        layers: int = 9,
        dropout: float = 0.0,
        mask_dim: int = 256,
        levels: int = 3,
    ):
        super().__init__()
        self.dim, self.heads, self.levels = dim, heads, levels
        self.query_feat = nn.Embedding(num_queries, dim)
        self.query_embed = nn.Embedding(num_queries, dim)
        self.level_embed = nn.Embedding(levels, dim)
        self.layers = nn.ModuleList(
            MaskedDecoderLayer(dim, heads, ffn_dim, dropout) for _ in range(layers)
        )
        self.decoder_norm = nn.LayerNorm(dim)
        self.mask_embed = MLP(dim, dim, mask_dim, 3)

    @property
    def num_outputs(self) -> int:
        return len(self.layers) + 1

    def forward(self, multi_scale: Sequence[torch.Tensor], mask_features: torch.Tensor) -> list[dict]:
        if len(multi_scale) != self.levels:
            raise ValueError(f"the decoder reads {self.levels} feature levels, got {len(multi_scale)}")
        memories, positions, shapes = [], [], []
        for i, x in enumerate(multi_scale):
            h, w = x.shape[-2:]
            shapes.append((h, w))
            memories.append(x.flatten(2).transpose(1, 2) + self.level_embed.weight[i].to(x.dtype))
            positions.append(_position_map(h, w, self.dim, x))
        b = mask_features.shape[0]
        query_pos = self.query_embed.weight[None].expand(b, -1, -1)
        tgt = self.query_feat.weight[None].expand(b, -1, -1)
        prediction, attn_mask = self._predict(tgt, mask_features, shapes[0])
        outputs = [prediction]
        for index, layer in enumerate(self.layers):
            level = index % self.levels
            # a query whose mask covers nothing attends everywhere instead of nowhere
            attn_mask = attn_mask & ~attn_mask.all(-1, keepdim=True)
            tgt = layer(tgt, memories[level], query_pos, positions[level], attn_mask)
            prediction, attn_mask = self._predict(tgt, mask_features, shapes[(index + 1) % self.levels])
            outputs.append(prediction)
        return outputs

    def _predict(self, tgt: torch.Tensor, mask_features: torch.Tensor, target: tuple[int, int]):
        """Heads on the current queries, and the attention mask for the next layer:
        (B * heads, N, h*w) True where the predicted mask, resized to ``target``, is < 0.5."""
        queries = self.decoder_norm(tgt)
        mask_logits = torch.einsum("bnc,bchw->bnhw", self.mask_embed(queries), mask_features)
        resized = F.interpolate(mask_logits, size=target, mode="bilinear", align_corners=False)
        blocked = (resized.sigmoid() < 0.5).flatten(2)  # (B, N, h*w)
        blocked = blocked.repeat_interleave(self.heads, dim=0).detach()
        return {"queries": queries, "mask_logits": mask_logits}, blocked
