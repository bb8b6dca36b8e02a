"""DeOP: proposals + ONE CLIP ViT pass with patch severance + CAL pooling.

Data flow (METHODS.md 1.1), for images (B, 3, H, W) in [0, 1], H and W multiples of 32:

1. proposal generator -> mask logits M (B, N, H/4, W/4)
2. CLIP ViT at native resolution with severed last block(s), guided by M ->
   dense patch embeddings F (B, L, E), L = (H/p) * (W/p)
3. CAL: anchors attend over F; heatmap pooling gated by sigmoid(M) -> (B, N, E)
4. logits = scale * cos(pooled, [text embeddings; void]) -> (B, N, K+1)
5. assembly (``models.assembly.semantic_scores``) -> (B, K, H/4, W/4)

``encode_image`` (steps 1-3) is independent of the vocabulary; ``classify`` (step 4) is
cheap, so one image pass serves any number of vocabularies.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from ..text import TextEncoder
from .anchors import AnchorPooling
from .assembly import semantic_scores
from .clip_vit import DenseClipViT, create_open_clip, create_tokenizer, resolve_open_clip_config
from .proposals import ProposalGenerator


def normalise(images: torch.Tensor, mean, std, valid: torch.Tensor | None) -> torch.Tensor:
    """(x - mean) / std, then zero outside the valid region (zero padding in normalised space)."""
    mean_t = images.new_tensor(mean).view(1, -1, 1, 1)
    std_t = images.new_tensor(std).view(1, -1, 1, 1)
    out = (images - mean_t) / std_t
    return out * valid if valid is not None else out


def valid_region(image_sizes, shape, device, dtype) -> torch.Tensor | None:
    """(B, 1, H, W) 1 inside each image's valid (unpadded) region, 0 in the padding."""
    b, _, h, w = shape
    if image_sizes is None or all(tuple(s) == (h, w) for s in image_sizes):
        return None
    valid = torch.zeros(b, 1, h, w, device=device, dtype=dtype)
    for i, (vh, vw) in enumerate(image_sizes):
        valid[i, :, :vh, :vw] = 1
    return valid


class DeOP(nn.Module):
    """The DeOP model. Build with ``DeOP(config)`` (random init) and load weights into it."""

    family = "deop"

    def __init__(self, config: ModelConfig):
        super().__init__()
        clip_cfg = resolve_open_clip_config(config.clip.model_name, config.clip.model_cfg)
        config.clip.model_cfg = clip_cfg  # the resolved architecture travels with the weights
        self.config = config
        clip = create_open_clip(clip_cfg)
        self.clip_visual = DenseClipViT(
            clip.visual,
            learned_pos_grid=config.clip.learned_pos_grid,
            learned_pos_blocks=config.clip.learned_pos_blocks,
            severance=config.clip.severance,
            severance_blocks=config.clip.severance_blocks,
        )
        self.text = TextEncoder(
            clip,
            create_tokenizer(clip_cfg),
            templates=config.text.templates,
            prompt_length=config.text.prompt_length,
        )
        embed_dim = self.clip_visual.output_dim
        self.proposals = ProposalGenerator(config.proposals, embed_dim)
        self.anchors = AnchorPooling(
            embed_dim,
            config.proposals.num_queries,
            num_heads=config.anchors.num_heads,
            dim_feedforward=config.anchors.dim_feedforward,
            dropout=config.anchors.dropout,
            pooling=config.anchors.pooling,
        )
        self.void_embedding = nn.Parameter(torch.randn(1, embed_dim) * embed_dim**-0.5)
        self.logit_scale = config.anchors.logit_scale

    @property
    def embed_dim(self) -> int:
        return self.clip_visual.output_dim

    def encode_image(self, images: torch.Tensor, image_sizes=None) -> dict:
        """Steps 1-3. images (B, 3, H, W) in [0, 1], zero-padded; image_sizes: valid (h, w) each.

        Returns ``mask_logits`` (B, N, H/4, W/4), ``pooled`` (B, N, E) normalised,
        ``proposal_outputs`` (the proposal generator's full output, for training).
        """
        pre = self.config.preprocess
        valid = valid_region(image_sizes, images.shape, images.device, images.dtype)
        proposal_out = self.proposals(normalise(images, pre.mean, pre.std, valid))
        mask_logits = proposal_out["mask_logits"]
        clip_in = normalise(images, pre.clip_mean, pre.clip_std, valid)
        dense, grid = self.clip_visual(clip_in, mask_logits)
        pooled = self.anchors(dense, grid, mask_logits)
        return {"mask_logits": mask_logits, "pooled": pooled, "proposal_outputs": proposal_out}

    def classify(self, pooled: torch.Tensor, text_embeddings: torch.Tensor) -> torch.Tensor:
        """pooled (B, N, E), text (K, E) normalised -> logits (B, N, K+1), void last."""
        void = F.normalize(self.void_embedding.float(), dim=-1)
        classifier = torch.cat([text_embeddings.float(), void], 0)
        return self.logit_scale * pooled.float() @ classifier.t()

    def forward(self, images: torch.Tensor, text_embeddings: torch.Tensor, image_sizes=None) -> dict:
        """Full pass: ``mask_logits`` (B, N, H/4, W/4) and ``class_logits`` (B, N, K+1)."""
        out = self.encode_image(images, image_sizes)
        out["class_logits"] = self.classify(out["pooled"], text_embeddings)
        return out

    def predict_scores(self, images: torch.Tensor, text_embeddings: torch.Tensor, image_sizes=None):
        """Inference: (B, 3, H, W) in [0, 1] -> (B, K, H/4, W/4) assembled class scores."""
        out = self.forward(images, text_embeddings, image_sizes)
        return semantic_scores(out["mask_logits"], out["class_logits"])

    def load_clip_weights(self, clip_model: nn.Module) -> None:
        """Copy an open_clip ``CLIP``'s image and text towers into this model.

        The architecture must match ``config.clip.model_cfg``; DeOP's own additions
        (learned positions, prompt context) keep their values.
        """
        visual = DenseClipViT(clip_model.visual, severance="none")
        text = TextEncoder(clip_model, create_tokenizer(self.config.clip.model_cfg))
        for target, source in ((self.clip_visual, visual), (self.text, text)):
            result = target.load_state_dict(source.state_dict(), strict=False)
            extra = [k for k in result.missing_keys if not k.startswith(("learned_pos", "prompt_context"))]
            if extra or result.unexpected_keys:
                raise ValueError(
                    f"CLIP weights do not fit the model: missing {extra[:3]}, "
                    f"unexpected {result.unexpected_keys[:3]}"
                )
