"""Training GKC (docs/methods.md section 4): Hungarian matching, mask-classification losses,
text diversification (synonyms) and text-guided knowledge distillation.

Per decoder output (the learnable queries' prediction and each of the decoder layers),
with the queries matched to the ground-truth regions (one region per class present in
the crop) by the final output's Hungarian matching (mask BCE 5 + dice 5, + class 2 when
the plain class-name loss is on):

- ``loss_ce``: cross entropy over the seen class names + no-object (weight 0.1), x2;
- ``loss_syn_ce``: the same over the image's own vocabulary (each present class renamed
  to its region's synonym draw, see :func:`~onepass_ovs.training.gkc_losses.
  image_vocabulary`), x10;
- ``loss_mask`` / ``loss_dice``: BCE and dice of the matched masks, x5 each, on 12544
  points (uncertainty-sampled as Mask2Former) or, for crops of at most that many pixels,
  on the full masks;
- ``loss_kd``: text-guided distillation (:func:`~onepass_ovs.training.gkc_losses.
  distillation_over_outputs`), x10, all outputs reusing the final matching.

The frozen CLIP text embeddings of every name are computed once; synonym scores and
teacher embeddings are computed once before training and cached under
``output_dir/training/`` (:mod:`~onepass_ovs.training.gkc_offline`).
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...data import semantic_to_instances
from ...data.synonyms import build_synonym_sets
from ...segmenter import Segmenter
from ..augment import SegmentationAugment
from ..checkpoints import list_checkpoints
from ..config import TrainConfig
from ..distributed import barrier, init_distributed
from ..gkc_losses import (
    SYNONYM_THRESHOLD,
    DistillationScale,
    distillation_over_outputs,
    eligible_synonyms,
    image_vocabulary,
)
from ..gkc_offline import (
    FrozenClip,
    load_frozen_clip,
    load_or_embed_regions,
    load_or_score_synonyms,
)
from ..losses import _num_masks, dice_loss
from ..matcher import HungarianMatcher
from ._common import (
    RUN_DIR,
    StageModel,
    default_config,
    family_model,
    prepare_stage,
    seeded_init,
    seen_record,
    train_and_save,
)

logger = logging.getLogger("onepass_ovs.training")

SCORES_FILE = "synonym_scores.json"
TEACHER_FILE = "teacher_embeddings.safetensors"
NO_DRAW = -1

LOSS_DEFAULTS: dict[str, float] = {
    "cost_class": 2.0, "cost_mask": 5.0, "cost_dice": 5.0, "eos_coef": 0.1,
    "weight_ce": 2.0, "weight_synonym_ce": 10.0, "weight_mask": 5.0, "weight_dice": 5.0,
    "weight_distill": 10.0,
}  # fmt: skip


def gkc_model(segmenter: Segmenter) -> nn.Module:
    """The segmenter's GKC model in float32."""
    return family_model(segmenter, "gkc", "train_gkc trains")


def gkc_train_augment(crop_size: int) -> SegmentationAugment:
    """Mask2Former's / GKC's: short side 0.8x..1.2x the crop, crop, flip, no colour jitter;
    padding 128 with ignore labels."""
    return SegmentationAugment(crop_size, short_side=(int(0.8 * crop_size), int(1.2 * crop_size)))


# -- points -------------------------------------------------------------------------------------


def point_sample(inputs: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """inputs (M, C, H, W), coords (M, P, 2) as (x, y) in [0, 1] -> (M, C, P), bilinear
    (pixel i centred at (i + 0.5) / size), zero outside."""
    grid = 2.0 * coords[:, :, None, :] - 1.0
    return F.grid_sample(inputs, grid, mode="bilinear", align_corners=False)[..., 0]


def uncertain_points(
    logits: torch.Tensor, num_points: int, oversample: float = 3.0, importance: float = 0.75
) -> torch.Tensor:
    """Mask2Former's training points: ``oversample * P`` uniform candidates, the
    ``importance * P`` most uncertain of them (logit closest to 0), plus uniform ones.
    logits (M, 1, h, w) -> coords (M, P, 2) in [0, 1]. Draws from torch's global RNG."""
    m = logits.shape[0]
    candidates = torch.rand(m, int(num_points * oversample), 2, device=logits.device)
    uncertainty = -point_sample(logits, candidates)[:, 0].abs()
    num_uncertain = int(importance * num_points)
    top = uncertainty.topk(num_uncertain, dim=1).indices
    chosen = candidates.gather(1, top[..., None].expand(-1, -1, 2))
    rest = torch.rand(m, num_points - num_uncertain, 2, device=logits.device)
    return torch.cat([chosen, rest], 1)


def mask_losses(
    pred: torch.Tensor, target: torch.Tensor, num_points: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed (over masks) BCE and dice of matched masks.

    pred (M, h, w) logits; target (M, H, W) bool. At most ``num_points`` target pixels:
    pred upsampled (bilinear) to (H, W), every pixel; else ``num_points`` points
    (:func:`uncertain_points`) sampled from both."""
    pred = pred.float()
    target = target.float()
    if target.shape[-2] * target.shape[-1] <= num_points:
        logits = F.interpolate(pred[:, None], size=target.shape[-2:], mode="bilinear",
                               align_corners=False)[:, 0].flatten(1)  # fmt: skip
        labels = target.flatten(1)
    else:
        with torch.no_grad():
            coords = uncertain_points(pred[:, None].detach(), num_points)
        logits = point_sample(pred[:, None], coords)[:, 0]
        labels = point_sample(target[:, None], coords)[:, 0]
    bce = F.binary_cross_entropy_with_logits(logits, labels, reduction="none").mean(1)
    return bce.sum(), dice_loss(logits.sigmoid(), labels).sum()


# -- the per-load synonym draw ------------------------------------------------------------------


class SynonymDraw:
    """Sample transform: augment, then draw each region's synonym.

    ``scores``: ``{stem: {dataset class id: probabilities over its synonyms}}``. Adds
    ``synonym_draw`` int64 (num dataset classes,): the drawn synonym's index in its class's
    list, ``-1`` for classes without a region in the (original) image. Each region draws
    uniformly among its synonyms with probability > ``threshold`` (:func:`~onepass_ovs.
    training.gkc_losses.eligible_synonyms`), from the sample's generator, so a draw is a
    pure function of (seed, epoch, index) and survives resume.
    """

    def __init__(self, augment, scores: Mapping[str, Mapping[int, Sequence[float]]] | None,
                 num_classes: int, threshold: float = SYNONYM_THRESHOLD):  # fmt: skip
        self.augment = augment
        self.scores = scores
        self.num_classes = num_classes
        self.threshold = threshold

    def __call__(self, sample: dict, generator: torch.Generator | None = None) -> dict:
        sample = self.augment(sample, generator) if self.augment is not None else dict(sample)
        draw = torch.full((self.num_classes,), NO_DRAW, dtype=torch.int64)
        if self.scores is not None:
            seed = int(torch.randint(0, 2**62, (1,), generator=generator))
            rng = random.Random(seed)
            for class_id, probs in sorted(self.scores.get(sample["stem"], {}).items()):
                indices = list(range(len(probs)))
                draw[class_id] = rng.choice(eligible_synonyms(indices, probs, self.threshold))
        return {**sample, "synonym_draw": draw}


# -- the stage model ----------------------------------------------------------------------------


class GKCStage(StageModel):
    """GKC with its frozen text tower; everything else trains.

    ``forward(images (B, 3, S, S) in [0, 1], labels (B, S, S) dataset ids, synonym_draw
    (B, C) per dataset class, stems list of B)`` -> ``{"loss", "loss_ce", "loss_syn_ce",
    "loss_mask", "loss_dice", "loss_kd"}``: the unweighted parts of the final output
    (``loss_kd``: the mean over outputs), and ``loss``, the weighted sum over every output.

    Args:
        class_names: the seen classes (K) in order; ``lookup`` maps dataset ids to them.
        synonym_sets: per seen class its names, its own first name first.
        teacher: (R, E) teacher embeddings and ``teacher_keys`` their ``(stem, dataset
            class id)``; None turns distillation off.
    """

    def __init__(
        self,
        model: nn.Module,
        class_names: Sequence[str],
        lookup: torch.Tensor,
        synonym_sets: Sequence[Sequence[str]],
        *,
        teacher: torch.Tensor | None = None,
        teacher_keys: Sequence[tuple[str, int]] = (),
        use_synonyms: bool = True,
        plain_loss: bool = True,
        num_points: int = 12544,
        **loss_options: float,
    ):
        unknown = sorted(set(loss_options) - set(LOSS_DEFAULTS))
        if unknown:
            raise TypeError(f"unknown GKC loss options {unknown}; known: {sorted(LOSS_DEFAULTS)}")
        if not (use_synonyms or plain_loss):
            raise ValueError(
                "with synonyms and the plain class-name loss both off nothing classifies"
            )
        distill = teacher is not None
        trainable = [name for name, _ in model.named_children() if name != "text_encoder"]
        trainable += ["void_embedding", "logit_scale"]
        if not distill:
            trainable.remove("distill_proj")
        super().__init__(model, trainable=trainable)
        options = {**LOSS_DEFAULTS, **loss_options}
        if not plain_loss:
            options["cost_class"] = 0.0
        self.options = options
        self.use_synonyms = use_synonyms
        self.plain_loss = plain_loss
        self.distill = distill
        self.num_points = int(num_points)
        self.class_names = list(class_names)
        self.synonym_sets = [list(s) for s in synonym_sets]
        if len(self.synonym_sets) != len(self.class_names):
            raise ValueError(
                f"{len(self.synonym_sets)} synonym sets for {len(self.class_names)} classes"
            )
        self.matcher = HungarianMatcher(
            options["cost_class"], options["cost_mask"], options["cost_dice"], mask_cost="bce"
        )
        names = [n for s in self.synonym_sets for n in s]
        self.row_names = names
        self.name_row = {n: i for i, n in enumerate(names)}
        self.first_row = torch.tensor([self.name_row[s[0]] for s in self.synonym_sets])
        offsets, total = [], 0
        for s in self.synonym_sets:
            offsets.append(total)
            total += len(s)
        with torch.no_grad():
            was_training = model.text_encoder.training
            model.text_encoder.eval()
            plain = model.text(self.class_names).float().detach().clone()  # (K, S, E)
            table = model.text(names)[:, 0].float().detach().clone()  # (total names, E)
            model.text_encoder.train(was_training)
        self.register_buffer("plain_text", plain, persistent=False)
        self.register_buffer("name_text", table, persistent=False)
        self.register_buffer("label_lookup", lookup, persistent=False)
        self.register_buffer("synonym_offset", torch.tensor(offsets), persistent=False)
        if distill:
            self.distill_scale = DistillationScale()
            self.register_buffer("teacher_embeddings", teacher.float().clone(), persistent=False)
            self.teacher_row = {(str(s), int(c)): i for i, (s, c) in enumerate(teacher_keys)}

    def targets(
        self, labels: torch.Tensor, draws: torch.Tensor, stems: Sequence[str]
    ) -> list[dict]:
        """Per image: ``labels`` (T,) seen indices, ``masks`` (T, S, S), ``dataset_ids``,
        ``name_rows`` (T,) the rows of the regions' drawn (or first) names, and with
        synonyms ``vocabulary_rows`` (V,) and ``vocabulary_targets`` (T,)."""
        out = []
        for b in range(labels.shape[0]):
            ids, masks = semantic_to_instances(labels[b])
            seen = self.label_lookup[ids]
            keep = seen >= 0
            ids, masks, seen = ids[keep], masks[keep], seen[keep]
            draw = draws[b, ids].clamp(min=0) if self.use_synonyms else torch.zeros_like(ids)
            rows = self.synonym_offset[seen] + draw
            target = {"labels": seen, "masks": masks, "dataset_ids": ids, "name_rows": rows}
            if self.use_synonyms:
                first = [s[0] for s in self.synonym_sets]
                vocabulary, vocab_targets = image_vocabulary(
                    first, seen.tolist(), [self.row_names[r] for r in rows.tolist()]
                )
                target["vocabulary_rows"] = torch.tensor(
                    [self.name_row[n] for n in vocabulary], device=labels.device
                )
                target["vocabulary_targets"] = torch.tensor(vocab_targets, device=labels.device)
            if self.distill:
                stem = stems[b]
                try:
                    teacher_rows = [self.teacher_row[(stem, int(c))] for c in ids.tolist()]
                except KeyError as err:
                    raise KeyError(
                        f"no teacher embedding for region {err.args[0]} (stale cache?)"
                    ) from err
                target["teacher"] = self.teacher_embeddings[
                    torch.tensor(teacher_rows, dtype=torch.long, device=labels.device)
                ]
            out.append(target)
        return out

    def forward(self, images, labels, synonym_draw, stems) -> dict:
        model = self.model
        o = self.options
        targets = self.targets(labels, synonym_draw, stems)
        outputs = model.run_decoders(images)
        last = len(outputs) - 1
        embeds = [model.class_embeddings(out["class_hidden"], i) for i, out in enumerate(outputs)]
        plain_logits = [model.classify(e, self.plain_text) for e in embeds]
        indices = self.matcher(plain_logits[-1], outputs[-1]["mask_logits"], targets)
        num_masks = _num_masks(targets, images.device)
        num_classes = len(self.class_names)
        eos = o["eos_coef"]
        plain_weight = torch.ones(num_classes + 1, device=images.device)
        plain_weight[-1] = eos
        terms: dict[str, torch.Tensor] = {}
        total = images.new_zeros(())
        for level, (out, embed, logits) in enumerate(
            zip(outputs, embeds, plain_logits, strict=True)
        ):
            parts = {}
            if self.plain_loss:
                target_classes = torch.full(logits.shape[:2], num_classes, dtype=torch.long,
                                            device=logits.device)  # fmt: skip
                for b, (q, t) in enumerate(indices):
                    target_classes[b, q] = targets[b]["labels"][t]
                parts["loss_ce"] = F.cross_entropy(logits.transpose(1, 2), target_classes,
                                                   weight=plain_weight)  # fmt: skip
            if self.use_synonyms:
                nll, weight = embed.new_zeros(()), embed.new_zeros(())
                for b, (q, t) in enumerate(indices):
                    text = self.name_text[targets[b]["vocabulary_rows"]]  # (V, E)
                    syn_logits = model.classify(embed[b : b + 1], text)[0]  # (N, V + 1)
                    vocab = text.shape[0]
                    target = torch.full((syn_logits.shape[0],), vocab, dtype=torch.long,
                                        device=syn_logits.device)  # fmt: skip
                    target[q] = targets[b]["vocabulary_targets"][t]
                    w = torch.where(target == vocab, eos, 1.0)
                    nll = nll + (F.cross_entropy(syn_logits, target, reduction="none") * w).sum()
                    weight = weight + w.sum()
                parts["loss_syn_ce"] = nll / weight
            bce = dice = out["mask_logits"].sum() * 0.0
            for b, (q, t) in enumerate(indices):
                if q.numel():
                    b_bce, b_dice = mask_losses(out["mask_logits"][b, q], targets[b]["masks"][t],
                                                self.num_points)  # fmt: skip
                    bce, dice = bce + b_bce, dice + b_dice
            parts["loss_mask"] = bce / num_masks
            parts["loss_dice"] = dice / num_masks
            weights = {"loss_ce": o["weight_ce"], "loss_syn_ce": o["weight_synonym_ce"],
                       "loss_mask": o["weight_mask"], "loss_dice": o["weight_dice"]}  # fmt: skip
            for name, value in parts.items():
                total = total + weights[name] * value
                if level == last:
                    terms[name] = value.detach()
        if self.distill:
            results = [{"distill_embeddings": model.distill_embeddings(out["class_hidden"], i)}
                       for i, out in enumerate(outputs)]  # fmt: skip
            kd = distillation_over_outputs(
                results, indices, [t["teacher"] for t in targets],
                [self.name_text[t["name_rows"]] for t in targets], self.distill_scale(),
            )  # fmt: skip
            total = total + o["weight_distill"] * kd
            terms["loss_kd"] = kd.detach() / len(outputs)
        terms["loss"] = total
        return terms


def gkc_loss(model: nn.Module, batch: dict) -> dict:
    """The engine's ``loss_fn`` for :class:`GKCStage`."""
    return model(batch["image"], batch["label"], batch["synonym_draw"], batch["stem"])


# -- the function -------------------------------------------------------------------------------


class _ClipLoader:
    """Loads each named CLIP once (the scorer defaults to the teacher)."""

    def __init__(self, device, region_view: str):
        self.device = device
        self.region_view = region_view
        self.loaded: dict[str, FrozenClip] = {}

    def __call__(self, spec: FrozenClip | str | None) -> FrozenClip | None:
        if spec is None or isinstance(spec, FrozenClip):
            return spec.to(self.device) if spec is not None else None
        if str(spec) not in self.loaded:
            self.loaded[str(spec)] = load_frozen_clip(str(spec), device=self.device,
                                                      region_view=self.region_view)  # fmt: skip
        return self.loaded[str(spec)]


def train_gkc(
    segmenter: Segmenter,
    dataset: Any,
    config: TrainConfig | None = None,
    *,
    synonym_sources: Sequence[Mapping[str, Sequence[str]]] = (),
    teacher: FrozenClip | str | None = None,
    scorer: FrozenClip | str | None = None,
    use_synonyms: bool = True,
    distill: bool = True,
    plain_loss: bool = True,
    crop_size: int | None = None,
    region_view: str = "box",
    augment=None,
    cache_dir: str | os.PathLike | None = None,
    resume: bool | str | os.PathLike = False,
    num_points: int = 12544,
    **loss_options: float,
) -> Segmenter:
    """Train a GKC model on ``dataset``'s seen classes.

    Args:
        segmenter: a ``gkc`` segmenter (e.g. ``Segmenter.from_config("gkc-clip-rn50")``
            with CLIP weights loaded: :func:`~onepass_ovs.training.stages.load_clip_weights`).
        dataset: a :class:`~onepass_ovs.data.FolderDataset` (or COCO-Stuff), built with
            ``unseen=...`` for the open-vocabulary protocol.
        config: default ``default_config("gkc")`` (AdamW 1e-4, wd 0.05, poly 0.9,
            backbone lr x0.1, grad-norm clip 0.01).
        synonym_sources: ``{class name: [synonyms]}`` mappings (a JSON file read by
            :func:`~onepass_ovs.data.synonyms.read_synonym_json`, WordNet's
            :func:`~onepass_ovs.data.synonyms.wordnet_synonyms`, the shapes world's
            :func:`~onepass_ovs.data.synonyms.shapes_world_synonyms`), merged by
            :func:`~onepass_ovs.data.synonyms.build_synonym_sets`.
        teacher: the distillation teacher, a :class:`FrozenClip` or a name for
            :func:`~onepass_ovs.training.gkc_offline.load_frozen_clip` (``"RN50/openai"``,
            the paper's); needed unless ``distill=False`` or its cache is valid.
        scorer: the CLIP scoring synonyms (the authors used ViT-B/32); default the teacher.
        use_synonyms, distill, plain_loss: turn text diversification, distillation and
            the plain class-name loss off (ablations).
        crop_size: square training crops; default the model's inference short side.
        region_view: how CLIPs given by name see a region (:class:`~onepass_ovs.training.
            gkc_offline.FrozenClip`): ``"box"`` (the authors' box crop) or ``"in_place"``
            (the whole image, the rest grey: objects keep their scale). A
            :class:`FrozenClip` passed in keeps its own.
        augment: replaces :func:`gkc_train_augment` (the synonym draw is kept).
        cache_dir: where the synonym scores and teacher embeddings are cached; default
            ``config.output_dir/training``.
        loss_options: :data:`LOSS_DEFAULTS` overrides (costs, weights, ``eos_coef``).

    Returns a Segmenter around the trained model (also saved to ``config.output_dir``).
    """
    config = config or default_config("gkc")
    model, size, names, lookup = prepare_stage(segmenter, dataset, crop_size, gkc_model)
    seen_ids = [i for i in range(len(dataset.classes)) if i not in set(dataset.unseen_ids)]
    run_dir = Path(config.output_dir) / RUN_DIR
    if not resume and list_checkpoints(run_dir):
        raise FileExistsError(
            f"{run_dir} already holds checkpoints; pass resume='auto' or use a new output_dir"
        )
    cache = Path(cache_dir) if cache_dir is not None else run_dir
    dist = init_distributed(config.device)
    clips = _ClipLoader(dist.device, region_view)

    sets = build_synonym_sets(names, synonym_sources) if use_synonyms else [[n] for n in names]
    scores = None
    if use_synonyms:
        by_id = {cid: s for cid, s in zip(seen_ids, sets, strict=True)}
        if dist.is_main:
            load_or_score_synonyms(cache / SCORES_FILE, dataset, by_id,
                                   clips(scorer or teacher),
                                   progress=config.progress_bar)  # fmt: skip
        barrier()
        scores = load_or_score_synonyms(cache / SCORES_FILE, dataset, by_id, None, write=False)
    teacher_emb, teacher_keys = None, ()
    if distill:
        if dist.is_main:
            load_or_embed_regions(cache / TEACHER_FILE, dataset, clips(teacher),
                                  progress=config.progress_bar)  # fmt: skip
        barrier()
        teacher_emb, teacher_keys = load_or_embed_regions(cache / TEACHER_FILE, dataset, None,
                                                          write=False)  # fmt: skip
        if teacher_emb.shape[1] != model.embed_dim:
            raise ValueError(
                f"the teacher's embeddings are {teacher_emb.shape[1]}-d but the model's text "
                f"width is {model.embed_dim}: distillation needs a teacher of the model's "
                "CLIP width (the paper's: the same RN50 as the text tower)"
            )

    del clips  # the CLIPs are not needed while training
    transform = SynonymDraw(augment or gkc_train_augment(size), scores, len(dataset.classes))

    def make_stage():  # called under train_and_save's requires_grad guard
        seeded_init(config.seed, "gkc_stage")
        return GKCStage(
            model, names, lookup, sets, teacher=teacher_emb, teacher_keys=teacher_keys,
            use_synonyms=use_synonyms, plain_loss=plain_loss, num_points=num_points,
            **loss_options,
        )  # fmt: skip

    return train_and_save(
        "gkc", model, make_stage, dataset, config, sample_transform=transform, resume=resume,
        loss_fn=gkc_loss,
        record={
            **seen_record(names, dataset, size),
            "synonyms": sets,
            "use_synonyms": use_synonyms,
            "distill": distill,
            "plain_loss": plain_loss,
            "teacher": getattr(teacher, "name", teacher) if distill else None,
            "scorer": getattr(scorer or teacher, "name", scorer or teacher) if use_synonyms else None,
            "teacher_mode": "eval",
            "region_view": getattr(teacher, "region_view", region_view),
            "loss_options": {**LOSS_DEFAULTS, **loss_options},
            "num_points": num_points,
        },
    )  # fmt: skip
