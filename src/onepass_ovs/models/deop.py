"""DeOP: proposals + ONE CLIP ViT pass with patch severance + CAL pooling.

Data flow (docs/architecture.md), for images (B, 3, H, W) in [0, 1], H and W multiples of 32:

1. proposal generator -> mask logits M (B, N, H/4, W/4)
2. CLIP ViT at native resolution with severed last block(s), guided by M ->
   dense patch embeddings F (B, L, E), L = (H/p) * (W/p)
3. CAL: anchors attend over F; heatmap pooling gated by sigmoid(M) -> (B, N, E)
4. logits = scale * cos(pooled, [text embeddings; void]) -> (B, N, K+1)
5. assembly (``models.assembly``): sum_n p_n[c] * sigmoid(up(M_n)), the mask logits
   upsampled to the input size before the sigmoid, as DeOP's authors and our training
   loss compute it.

``encode_image`` (steps 1-3) is independent of the vocabulary; ``decode_scores`` (steps
4-5) is cheap, so one image pass serves any number of vocabularies.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ClipConfig, ModelConfig, PreprocessConfig, TextConfig
from .anchors import AnchorConfig, AnchorPooling
from .assembly import AssembledScores
from .preprocessing import normalise, valid_region
from .proposals import ProposalConfig, ProposalGenerator
from .registry import register_family, register_preset
from .towers import (
    TINY_CLIP_CFG,
    build_dense_tower,
    build_text_tower,
    check_activation_matches,
    create_clip,
    resolve_open_clip_config,
)


@dataclass
class DeOPConfig:
    """DeOP's own section of the model config: the proposal generator and CAL."""

    proposals: ProposalConfig = field(default_factory=ProposalConfig)
    anchors: AnchorConfig = field(default_factory=AnchorConfig)


class DeOP(nn.Module):
    """The DeOP model. Build with ``DeOP(config)`` (random init) and load weights into it."""

    family = "deop"

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        clip = create_clip(config.clip)  # resolves config.clip.model_cfg: it travels with the weights
        self.clip_visual = build_dense_tower(clip.visual, config.clip)
        self.text = build_text_tower(clip, config.clip, config.text)
        section: DeOPConfig = config.family_config
        embed_dim = self.clip_visual.output_dim
        self.proposals = ProposalGenerator(section.proposals, embed_dim)
        anchors = section.anchors
        self.anchors = AnchorPooling(
            embed_dim,
            section.proposals.num_queries,
            num_heads=anchors.num_heads,
            dim_feedforward=anchors.dim_feedforward,
            dropout=anchors.dropout,
            pooling=anchors.pooling,
        )
        self.void_embedding = nn.Parameter(torch.randn(1, embed_dim) * embed_dim**-0.5)
        self.logit_scale = anchors.logit_scale

    @property
    def embed_dim(self) -> int:
        return self.clip_visual.output_dim

    def encode_image(self, images: torch.Tensor, image_sizes=None) -> dict:
        """Steps 1-3. images (B, 3, H, W) in [0, 1], zero-padded; image_sizes: valid (h, w) each.

        Returns ``mask_logits`` (B, N, H/4, W/4), ``pooled`` (B, N, E) normalised,
        ``proposal_outputs`` (the proposal generator's full output, for training) and
        ``canvas`` (H, W), the padded input size the masks are assembled at.
        """
        pre = self.config.preprocess
        valid = valid_region(image_sizes, images.shape, images.device, images.dtype)
        proposal_out = self.proposals(normalise(images, pre.mean, pre.std, valid))
        mask_logits = proposal_out["mask_logits"]
        clip_in = normalise(images, pre.clip_mean, pre.clip_std, valid)
        dense, grid = self.clip_visual(clip_in, mask_logits)
        pooled = self.anchors(dense, grid, mask_logits)
        return {
            "mask_logits": mask_logits,
            "pooled": pooled,
            "proposal_outputs": proposal_out,
            "canvas": tuple(images.shape[-2:]),
        }

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

    def decode_scores(self, encoding: dict, text_embeddings: torch.Tensor) -> AssembledScores:
        """Steps 4-5: assembled class scores (B, K, H, W) on the padded canvas, kept as
        masks + class probabilities and evaluated lazily in bounded memory."""
        logits = self.classify(encoding["pooled"], text_embeddings)
        return AssembledScores(encoding["mask_logits"], logits, encoding["canvas"])

    def predict_scores(self, images: torch.Tensor, text_embeddings: torch.Tensor, image_sizes=None):
        """Inference: (B, 3, H, W) in [0, 1] -> (B, K, H, W) assembled class scores."""
        return self.decode_scores(self.encode_image(images, image_sizes), text_embeddings)

    def load_clip_weights(self, clip_model: nn.Module) -> None:
        """Copy an open_clip ``CLIP``'s image and text towers into this model.

        The architecture must match ``config.clip`` (QuickGELU included); DeOP's own
        additions (learned positions, prompt context) keep their values.
        """
        check_activation_matches(self.clip_visual, clip_model.visual)
        plain = copy.deepcopy(self.config.clip)
        plain.severance, plain.learned_pos_grid, plain.learned_pos_blocks = "none", 0, ()
        visual = build_dense_tower(clip_model.visual, plain)
        text = build_text_tower(clip_model, plain, TextConfig())
        for target, source in ((self.clip_visual, visual), (self.text, text)):
            result = target.load_state_dict(source.state_dict(), strict=False)
            extra = [k for k in result.missing_keys if not k.startswith(("learned_pos", "prompt_context"))]
            if extra or result.unexpected_keys:
                raise ValueError(
                    f"CLIP weights do not fit the model: missing {extra[:3]}, "
                    f"unexpected {result.unexpected_keys[:3]}"
                )


def _upgrade_v1(data: dict) -> dict:
    """Format 1 kept the proposal and CAL sections at the top level."""
    section = {key: data.pop(key) for key in ("proposals", "anchors") if key in data}
    data.setdefault("deop", section)
    return data


register_family(
    "deop",
    build=DeOP,
    config_type=DeOPConfig,
    upgrade=_upgrade_v1,
    description="proposals + one CLIP ViT pass with patch severance + CAL",
)


# -- presets ------------------------------------------------------------------------------------


@register_preset
def deop_vit_b16() -> ModelConfig:
    """The paper's architecture: CLIP ViT-B/16 (OpenAI's, so QuickGELU), ResNet-101c
    MaskFormer proposals, CAL; learned positions at the input and blocks 1-5, weighted
    severance in the last block."""
    model_cfg = {**resolve_open_clip_config("ViT-B-16", None), "quick_gelu": True}
    clip = ClipConfig(
        model_name="ViT-B-16",
        model_cfg=model_cfg,
        learned_pos_grid=24,
        learned_pos_blocks=(1, 2, 3, 4, 5),
        severance="weighted",
        severance_blocks=(11,),
    )
    return ModelConfig(family="deop", name="deop-vit-b16", clip=clip, family_config=DeOPConfig())


@register_preset
def deop_tiny() -> ModelConfig:
    """A toy-sized DeOP for tests (random weights, 64 px)."""
    return ModelConfig(
        family="deop",
        name="deop-tiny",
        preprocess=PreprocessConfig(short_side=64, max_long_side=256, pad_multiple=32),
        clip=ClipConfig(
            model_name="tiny",
            model_cfg=copy.deepcopy(TINY_CLIP_CFG),
            learned_pos_grid=4,
            learned_pos_blocks=(1,),
            severance="weighted",
            severance_blocks=(1,),
        ),
        text=TextConfig(templates="single", prompt_length=0),
        family_config=DeOPConfig(
            proposals=ProposalConfig(
                backbone="resnet18",
                backbone_kwargs={"channels": [8, 16, 32, 64], "stem_width": 8},
                conv_dim=16,
                mask_dim=16,
                hidden_dim=16,
                num_queries=6,
                num_heads=2,
                dim_feedforward=32,
                dec_layers=2,
                norm_groups=4,
                class_hidden=32,
            ),
            anchors=AnchorConfig(num_heads=2, dim_feedforward=32),
        ),
    )
