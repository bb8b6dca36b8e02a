"""MaskFormer-style proposal generator: class-agnostic mask proposals from a timm backbone.

backbone (strides 4/8/16/32) -> FPN pixel decoder (GroupNorm) -> stride-4 mask features;
a DETR decoder (no encoder) with N learned queries reads the stride-32 map; each query
gives a mask embedding (mask logits = embedding . mask features) and a class embedding
classified by cosine against text embeddings (used to train the proposals by matching,
and by the GKC-style family; DeOP ignores it at inference).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .layers import MLP, DecoderLayer, conv_gn, sine_position_embedding


@dataclass
class ProposalConfig:
    """MaskFormer-style proposal generator on a timm backbone."""

    backbone: str = "resnet101c"
    backbone_kwargs: dict[str, Any] = field(default_factory=lambda: {"stem_width": 64})
    conv_dim: int = 256
    mask_dim: int = 256
    hidden_dim: int = 256
    num_queries: int = 100
    num_heads: int = 8
    dim_feedforward: int = 2048
    dec_layers: int = 6
    dropout: float = 0.1
    norm_groups: int = 32
    # Class head (MLP hidden_dim -> class_hidden -> text dim, cosine with text): used to
    # train the proposals (matching), ignored by DeOP at inference.
    class_hidden: int = 1024


class PixelDecoder(nn.Module):
    """FPN over backbone features -> stride-4 mask features (B, mask_dim, H/4, W/4)."""

    def __init__(self, in_channels: list[int], conv_dim: int, mask_dim: int, groups: int):
        super().__init__()
        self.lateral = nn.ModuleList()
        self.output = nn.ModuleList()
        for i, cin in enumerate(in_channels):
            top = i == len(in_channels) - 1
            # the coarsest level has no lateral: its 3x3 output conv reads it directly
            self.lateral.append(nn.Identity() if top else conv_gn(cin, conv_dim, 1, groups, False))
            self.output.append(conv_gn(cin if top else conv_dim, conv_dim, 3, groups, True))
        self.mask_features = nn.Conv2d(conv_dim, mask_dim, 3, padding=1)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        y = self.output[-1](features[-1])
        for i in range(len(features) - 2, -1, -1):
            lateral = self.lateral[i](features[i])
            y = lateral + F.interpolate(y, size=lateral.shape[-2:], mode="nearest")
            y = self.output[i](y)
        return self.mask_features(y)


class ProposalGenerator(nn.Module):
    """Mask proposals for DeOP.

    Args:
        config: :class:`ProposalConfig`.
        text_dim: dimension of the text embeddings the class head is compared with.

    ``forward(images)`` with images (B, 3, H, W) (normalised, H, W multiples of 32) returns
    a dict: ``mask_logits`` (B, N, H/4, W/4), ``query_embeddings`` (B, N, text_dim)
    L2-normalised class embeddings, and ``aux`` (list of the same two per earlier decoder
    layer, for deep supervision).
    """

    def __init__(self, config: ProposalConfig, text_dim: int):
        super().__init__()
        import timm

        self.config = config
        self.backbone = timm.create_model(
            config.backbone,
            pretrained=False,
            features_only=True,
            out_indices=(1, 2, 3, 4),
            **_json_kwargs(config.backbone_kwargs),
        )
        channels = self.backbone.feature_info.channels()
        reductions = self.backbone.feature_info.reduction()
        if list(reductions) != [4, 8, 16, 32]:
            raise ValueError(f"backbone {config.backbone!r} must give strides 4/8/16/32, got {reductions}")
        self.pixel_decoder = PixelDecoder(
            channels, config.conv_dim, config.mask_dim, config.norm_groups
        )
        hidden = config.hidden_dim
        self.input_proj = nn.Conv2d(channels[-1], hidden, 1)
        self.query_embed = nn.Embedding(config.num_queries, hidden)
        self.layers = nn.ModuleList(
            DecoderLayer(hidden, config.num_heads, config.dim_feedforward, config.dropout)
            for _ in range(config.dec_layers)
        )
        self.decoder_norm = nn.LayerNorm(hidden)
        self.mask_embed = MLP(hidden, hidden, config.mask_dim, 3)
        self.class_embed = MLP(hidden, config.class_hidden, text_dim, 2)
        self.backbone.to(memory_format=torch.channels_last)
        self.pixel_decoder.to(memory_format=torch.channels_last)

    def forward(self, images: torch.Tensor) -> dict:
        # channels-last convolutions are several times faster on CPU (oneDNN) and use tensor
        # cores on CUDA; the weights are converted once in __init__
        features = self.backbone(images.contiguous(memory_format=torch.channels_last))
        mask_features = self.pixel_decoder(features)
        top = self.input_proj(features[-1])
        b, c, h, w = top.shape
        memory = top.flatten(2).transpose(1, 2)
        memory_pos = sine_position_embedding(h, w, c, device=top.device, dtype=top.dtype)
        query_pos = self.query_embed.weight.unsqueeze(0).expand(b, -1, -1)
        tgt = torch.zeros_like(query_pos)
        outputs = []
        for layer in self.layers:
            tgt = layer(tgt, memory, query_pos, memory_pos)
            outputs.append(self._heads(self.decoder_norm(tgt), mask_features))
        final = outputs[-1]
        final["aux"] = outputs[:-1]
        return final

    def _heads(self, queries: torch.Tensor, mask_features: torch.Tensor) -> dict:
        mask_logits = torch.einsum("bnc,bchw->bnhw", self.mask_embed(queries), mask_features)
        embeddings = F.normalize(self.class_embed(queries), dim=-1)
        return {"mask_logits": mask_logits, "query_embeddings": embeddings}


def classify_queries(
    query_embeddings: torch.Tensor,
    text_embeddings: torch.Tensor,
    void_embedding: torch.Tensor,
    logit_scale: float,
) -> torch.Tensor:
    """Cosine classifier of proposal queries with a no-object class appended last.

    query_embeddings (B, N, E) L2-normalised, text_embeddings (K, E) L2-normalised,
    void_embedding (1, E) (normalised here) -> logits (B, N, K+1) =
    ``logit_scale * cos(query, [text; void])``.
    """
    void = F.normalize(void_embedding.float(), dim=-1)
    classifier = torch.cat([text_embeddings.float(), void], 0)
    return logit_scale * query_embeddings.float() @ classifier.t()


class ProposalClassifier(nn.Module):
    """The learned "no object" embedding that training the proposals by matching needs.

    Kept outside :class:`ProposalGenerator` so that the generator's weights (and every
    saved model) stay the same; the proposal training stage owns one of these.

    ``forward(query_embeddings (B, N, E), text_embeddings (K, E))`` -> (B, N, K+1)
    logits, no-object last (see :func:`classify_queries`).
    """

    def __init__(self, embed_dim: int, logit_scale: float = 100.0):
        super().__init__()
        self.void_embedding = nn.Parameter(torch.randn(1, embed_dim) * embed_dim**-0.5)
        self.logit_scale = logit_scale

    def forward(
        self, query_embeddings: torch.Tensor, text_embeddings: torch.Tensor
    ) -> torch.Tensor:
        return classify_queries(
            query_embeddings, text_embeddings, self.void_embedding, self.logit_scale
        )


def _json_kwargs(kwargs: dict) -> dict:
    # JSON turns tuples into lists; timm wants tuples for channel specs.
    return {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
