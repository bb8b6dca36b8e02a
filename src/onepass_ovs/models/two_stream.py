"""Two-stream baseline: crop every proposal and run CLIP on each crop (for comparison only).

This is the approach DeOP replaces (ZegFormer / SimBaseline): the same proposal masks, but
each proposal n is classified by a separate CLIP pass over its own crop:

    crop = bounding box of (sigmoid(M_n) > threshold), pixels outside the mask painted with
           CLIP's mean colour, padded to a square, resized to CLIP's input size
    logits_n = scale * cos(CLIP(crop), text)

then assembled exactly as DeOP (``semantic_scores``). N proposals cost N CLIP passes.
It wraps a DeOP model and reuses its proposal generator, plain CLIP and text encoder, so
benchmarks compare the two designs on identical weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .assembly import AssembledScores
from .deop import DeOP
from .preprocessing import normalise, valid_region


class TwoStreamBaseline(nn.Module):
    """Segmenter-compatible model: ``predict_scores(images, text, image_sizes)``.

    Args:
        deop: a DeOP model whose proposals, CLIP and text encoder are used.
        crop_size: side of the CLIP input crops (default: the CLIP config's image size).
        mask_threshold: probability above which a pixel belongs to a proposal's crop.
        crop_batch: crops per CLIP forward (bounds memory).
    """

    def __init__(self, deop: DeOP, *, crop_size: int | None = None, mask_threshold: float = 0.5,
                 crop_batch: int = 32):
        super().__init__()
        self.deop = deop
        self.config = deop.config
        self.text = deop.text
        vision = deop.config.clip.model_cfg.get("vision_cfg", {})
        self.crop_size = crop_size or int(vision.get("image_size", 224))
        self.mask_threshold = mask_threshold
        self.crop_batch = crop_batch

    def crops(self, image: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """image (3, H, W) in [0, 1], masks (N, H, W) probabilities -> (N, 3, S, S) crops."""
        mean = image.new_tensor(self.config.preprocess.clip_mean).view(3, 1, 1)
        out = []
        for mask in masks:
            inside = mask > self.mask_threshold
            if not inside.any():  # an empty proposal still gets classified: use the image
                inside = torch.ones_like(inside)
            ys = inside.any(1).nonzero()
            xs = inside.any(0).nonzero()
            y0, y1, x0, x1 = ys[0].item(), ys[-1].item() + 1, xs[0].item(), xs[-1].item() + 1
            region = torch.where(inside[y0:y1, x0:x1], image[:, y0:y1, x0:x1], mean)
            h, w = region.shape[-2:]
            side = max(h, w)
            square = mean.expand(3, side, side).clone()
            top, left = (side - h) // 2, (side - w) // 2
            square[:, top : top + h, left : left + w] = region
            out.append(
                F.interpolate(square[None], size=(self.crop_size,) * 2, mode="bilinear",
                              align_corners=False, antialias=side > self.crop_size)[0]
            )
        return torch.stack(out)

    def predict_scores(self, images: torch.Tensor, text_embeddings: torch.Tensor, image_sizes=None):
        """(B, 3, H, W) in [0, 1] -> (B, K, H, W) assembled scores; N CLIP passes per image."""
        deop = self.deop
        pre = self.config.preprocess
        valid = valid_region(image_sizes, images.shape, images.device, images.dtype)
        mask_logits = deop.proposals(normalise(images, pre.mean, pre.std, valid))["mask_logits"]
        masks = F.interpolate(mask_logits.float(), size=images.shape[-2:], mode="bilinear",
                              align_corners=False).sigmoid()
        if valid is not None:
            masks = masks * valid
        logits = []
        for image, image_masks in zip(images, masks, strict=True):
            crops = self.crops(image, image_masks)
            embeddings = []
            for start in range(0, len(crops), self.crop_batch):
                batch = normalise(crops[start : start + self.crop_batch], pre.clip_mean, pre.clip_std, None)
                embeddings.append(deop.clip_visual.global_embedding(batch.to(images.dtype)))
            emb = F.normalize(torch.cat(embeddings).float(), dim=-1)
            class_logits = deop.logit_scale * emb @ text_embeddings.float().t()
            # no void class in a two-stream classifier: give it zero probability
            void = class_logits.new_full((class_logits.shape[0], 1), -1e4)
            logits.append(torch.cat([class_logits, void], 1))
        return AssembledScores(mask_logits, torch.stack(logits), images.shape[-2:])
