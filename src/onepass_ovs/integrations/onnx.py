"""ONNX export of the image side, and a Segmenter that runs it on onnxruntime.

``export_onnx(segmenter, folder)`` writes a self-contained folder::

    config.json         the model config (preprocessing, windows, architecture)
    image_model.onnx    images + valid region + text embeddings -> class scores
    text.safetensors    the text tower's weights (run in torch by the loader)
    onnx.json           what the graph takes and returns (format, outputs, opset)

The image graph's inputs are ``images`` (B, 3, H, W) float32 in [0, 1], zero-padded to
the config's pad multiple; ``valid`` (B, 1, H, W) float32, 1 inside each image and 0 in
its padding; ``text_embeddings`` (K, E) (SED: (K, templates, E)), so the vocabulary stays open.
Batch, H, W and K are dynamic axes. Outputs:

- clip, SED: ``scores`` (B, K, h, w) class probabilities (stride p for clip, 4 for SED);
- DeOP, GKC: ``mask_logits`` (B, N, H/4, W/4) and ``class_probs`` (B, N, K), which the
  loader assembles lazily exactly as the torch model does
  (:class:`~onepass_ovs.models.assembly.AssembledScores`), so K x H x W maps of large
  images never exist at once.

The text side stays in torch: ``text.safetensors`` holds the text tower's parameters and
buffers, the tokenizer and prompt templates come from ``config.json`` (open_clip's
tokenizer files ship with open_clip, so loading works offline). ``Segmenter.from_onnx``
returns a :class:`~onepass_ovs.segmenter.Segmenter` whose model runs the image side on
onnxruntime, so ``segment(image, vocabulary)``, sliding windows, ``background=`` and
``unknown_threshold=`` behave as in torch.

Limitations:

- SED is exported without category early rejection (its class set depends on the data):
  the exported config has ``rejection_top_k = 0`` (and one class chunk). Its graph takes
  one image per call (the decoder loops over images in Python); the loader loops.
- GKC is not exported: its multi-scale deformable attention splits tokens by Python
  sizes, which would freeze the image size in the graph.
- ``masks=`` (the clip family's mask classification) and the mask-reading severance
  variants are not available from ONNX; float32 only.
- The image size is dynamic for every exported family (validated in the tests at sizes
  other than the traced one); sizes must still be multiples of the pad multiple, which
  the Segmenter's preprocessing guarantees.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

ONNX_FORMAT = "onepass-ovs-onnx"
ONNX_FORMAT_VERSION = 1
IMAGE_MODEL_NAME = "image_model.onnx"
TEXT_WEIGHTS_NAME = "text.safetensors"
ONNX_META_NAME = "onnx.json"
DEFAULT_OPSET = 17
EXPORTABLE_FAMILIES = ("deop", "clip", "sed")


def _require(module: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(
            f"{module} is needed for ONNX export/inference: pip install 'onepass-ovs[onnx]'"
        ) from err


def _text_module_name(model: nn.Module) -> str:
    """The submodule that holds the text tower (``text``, or GKC's ``text_encoder``)."""
    for name in ("text", "text_encoder"):
        if isinstance(getattr(model, name, None), nn.Module):
            return name
    raise ValueError(f"{type(model).__name__} has no text tower submodule ('text' or 'text_encoder')")


def _traceable_mha_forward(self: nn.MultiheadAttention, query, key, value, key_padding_mask=None,
                           need_weights=False, attn_mask=None, average_attn_weights=True,
                           is_causal=False):
    """nn.MultiheadAttention's inference forward written with shape-agnostic reshapes.

    torch's own implementation bakes the traced sequence length into its reshapes, which
    would fix the image size of the exported graph. Dropout is off (eval); returns
    (output, None) like ``need_weights=False``.
    """
    import torch.nn.functional as F

    if need_weights or key_padding_mask is not None or is_causal:
        raise NotImplementedError("ONNX export supports attention without weights or padding masks")
    if not self._qkv_same_embed_dim:
        raise NotImplementedError("ONNX export needs packed q/k/v projections")
    if not self.batch_first:
        query, key, value = (t.transpose(0, 1) for t in (query, key, value))
    w_q, w_k, w_v = self.in_proj_weight.chunk(3)
    b_q, b_k, b_v = self.in_proj_bias.chunk(3) if self.in_proj_bias is not None else (None,) * 3
    heads = self.num_heads
    q, k, v = (
        F.linear(t, w, b).unflatten(-1, (heads, -1)).transpose(1, 2)
        for t, w, b in ((query, w_q, b_q), (key, w_k, b_k), (value, w_v, b_v))
    )  # (B, heads, T, d)
    mask = None
    if attn_mask is not None:
        mask = ~attn_mask if attn_mask.dtype == torch.bool else attn_mask  # SDPA: True = keep
        if mask.dim() == 3:  # (B * heads, L, S)
            mask = mask.unflatten(0, (-1, heads))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    out = self.out_proj(out.transpose(1, 2).flatten(2))
    return (out if self.batch_first else out.transpose(0, 1)), None


def _one_image_class_attention(self, x: torch.Tensor, rows_per_image) -> torch.Tensor:
    """SED's ClassAttention for the rows of ONE image, without the per-image split (whose
    Python sizes would fix the number of classes in the graph)."""
    import torch.nn.functional as F

    if len(rows_per_image) != 1:
        raise RuntimeError("the exported SED graph takes one image per call")
    p = self.pool
    t = F.avg_pool2d(x, p) if p > 1 else x
    _, _, h, w = t.shape
    tokens = t.permute(2, 3, 0, 1).flatten(0, 1)  # (h*w, classes, C)
    t = self.attend(tokens).unflatten(0, (h, w)).permute(2, 3, 0, 1)
    if p > 1:
        t = F.interpolate(t, size=x.shape[-2:], mode="bilinear", align_corners=True)
    return x + t


def _make_traceable(model: nn.Module) -> None:
    """Give the export copy's modules forwards whose graphs keep sizes dynamic:
    nn.MultiheadAttention everywhere, SED's class attention (one image per call)."""
    import types

    from ..models.sed import ClassAttention

    for module in model.modules():
        if isinstance(module, nn.MultiheadAttention):
            module.forward = types.MethodType(_traceable_mha_forward, module)
        elif isinstance(module, ClassAttention):
            module.forward = types.MethodType(_one_image_class_attention, module)


class _ImageGraph(nn.Module):
    """What is traced: (images, valid, text_embeddings) -> scores, or assembly inputs."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor, valid: torch.Tensor, text_embeddings: torch.Tensor):
        from ..models.assembly import AssembledScores

        encoding = self.model.encode_image(images, valid)  # valid_region accepts the mask
        scores = self.model.decode_scores(encoding, text_embeddings)
        if isinstance(scores, AssembledScores):
            return scores.mask_logits.float(), scores.probs.float()
        return scores.float()


def _check_same(reference, traced) -> None:
    """The traceable attention must reproduce torch's (float32 rounding apart)."""
    pairs = zip(reference, traced, strict=True) if isinstance(reference, tuple) else [(reference, traced)]
    for ref, out in pairs:
        if not torch.allclose(ref, out, rtol=1e-3, atol=1e-4):
            raise RuntimeError(
                "internal error: the export copy of the model disagrees with the model "
                f"(max difference {(ref - out).abs().max().item():.3g})"
            )


def _sample_size(config) -> tuple[int, int]:
    """A non-square traced size (H != W, so the exported graph cannot confuse them)."""
    multiple = config.preprocess.pad_multiple
    side = max(multiple * 2, (min(config.preprocess.short_side, 256) // multiple) * multiple)
    return side, side + multiple


def export_onnx(segmenter, folder: str | os.PathLike, *, opset: int = DEFAULT_OPSET,
                sample_size: tuple[int, int] | None = None) -> Path:
    """Write the ONNX folder for ``segmenter`` (see the module docstring) and return it.

    Supported: DeOP, the clip family (any severance but the mask-reading ones) and SED
    (exported without category early rejection, one image per graph call; the loader
    loops over a batch). GKC is not supported (see the module docstring). The graph is traced on CPU in
    float32 at ``sample_size`` (default: a non-square size near the config's short side);
    batch, height, width and the number of classes are dynamic.
    """
    _require("onnx")
    from safetensors.torch import save_file

    from ..models.registry import build_model, config_from_dict

    source = segmenter.model
    if isinstance(source, OnnxImageModel):
        raise ValueError("this Segmenter already runs an ONNX graph; copy its folder instead")
    config = config_from_dict(source.config.to_dict())
    if config.family not in EXPORTABLE_FAMILIES:
        raise NotImplementedError(
            f"ONNX export of the {config.family!r} family is not supported (exportable: "
            f"{', '.join(EXPORTABLE_FAMILIES)}); GKC's multi-scale deformable attention splits "
            "its tokens by Python sizes, which would fix the image size in the graph"
        )
    one_image = config.family == "sed"
    if one_image:
        # no category early rejection (data-dependent class set); one class chunk
        # (the chunk loop would fix K in the graph; chunking only bounds memory)
        config = config.replace(**{"family_config.rejection_top_k": 0,
                                   "family_config.class_chunk": 1 << 30})
    if getattr(source, "needs_masks", False):
        raise ValueError(
            f"severance {config.clip.severance!r} reads external masks; export a model with "
            "a dense severance (e.g. 'clearclip') instead"
        )
    # a CPU float32 copy with the exported config (SED: rejection off)
    model = build_model(config)
    model.load_state_dict(source.state_dict())
    model = model.float().eval()

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    text_name = _text_module_name(model)
    text_module = getattr(model, text_name)
    with torch.inference_mode():
        sample_text = model.text(["a", "b"]).float()
    h, w = sample_size or _sample_size(config)
    images = torch.rand(1, 3, h, w)
    valid = torch.ones(1, 1, h, w)
    with torch.no_grad():
        reference = _ImageGraph(model)(images, valid, sample_text)
    _make_traceable(model)
    graph = _ImageGraph(model).eval()
    with torch.no_grad():
        sample_out = graph(images, valid, sample_text)
    _check_same(reference, sample_out)
    assembled = isinstance(sample_out, tuple)
    outputs = ["mask_logits", "class_probs"] if assembled else ["scores"]
    dynamic = {
        "images": {0: "batch", 2: "height", 3: "width"},
        "valid": {0: "batch", 2: "height", 3: "width"},
        "text_embeddings": {0: "classes"},
    }
    if assembled:
        dynamic["mask_logits"] = {0: "batch", 2: "mask_height", 3: "mask_width"}
        dynamic["class_probs"] = {0: "batch", 2: "classes"}
    else:
        dynamic["scores"] = {0: "batch", 1: "classes", 2: "score_height", 3: "score_width"}
    import warnings

    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)  # the fused MHA kernel has no ONNX op
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings about Python ints
            torch.onnx.export(
                graph, (images, valid, sample_text), str(folder / IMAGE_MODEL_NAME),
                input_names=["images", "valid", "text_embeddings"], output_names=outputs,
                dynamic_axes=dynamic, opset_version=opset, dynamo=False,
            )
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    config.save(folder / "config.json")
    tensors = {f"param.{n}": p.detach().contiguous() for n, p in text_module.named_parameters()}
    tensors.update(
        {f"buffer.{n}": b.detach().contiguous() for n, b in text_module.named_buffers()}
    )
    save_file(tensors, str(folder / TEXT_WEIGHTS_NAME))
    meta = {
        "format": ONNX_FORMAT,
        "format_version": ONNX_FORMAT_VERSION,
        "family": config.family,
        "opset": opset,
        "inputs": ["images", "valid", "text_embeddings"],
        "outputs": outputs,
        "text_module": text_name,
        "text_rank": sample_text.dim(),
        "traced_size": [h, w],
        "max_batch": 1 if one_image else None,
    }
    (folder / ONNX_META_NAME).write_text(json.dumps(meta, indent=2) + "\n")
    return folder


def _load_text(model_on_meta: nn.Module, name: str, path: Path) -> nn.Module:
    """Materialise the text submodule of a model built on the meta device from safetensors."""
    from safetensors.torch import load_file

    module = getattr(model_on_meta, name)
    module.to_empty(device="cpu")
    tensors = load_file(str(path))
    expected = {f"param.{n}" for n, _ in module.named_parameters()}
    expected |= {f"buffer.{n}" for n, _ in module.named_buffers()}
    missing, unexpected = expected - set(tensors), set(tensors) - expected
    if missing or unexpected:
        raise ValueError(
            f"{path}: text weights do not fit the config: missing {sorted(missing)[:3]}, "
            f"unexpected {sorted(unexpected)[:3]}"
        )
    with torch.no_grad():
        for key, value in tensors.items():
            kind, _, dotted = key.partition(".")
            owner_path, _, attr = dotted.rpartition(".")
            owner = module.get_submodule(owner_path) if owner_path else module
            target = getattr(owner, attr)
            if tuple(target.shape) != tuple(value.shape):
                raise ValueError(f"{path}: {dotted} has shape {tuple(value.shape)}, "
                                 f"expected {tuple(target.shape)}")
            target.copy_(value)
    return module


class OnnxImageModel(nn.Module):
    """A SegmentationModel-shaped wrapper: text in torch, image side on onnxruntime.

    ``text(vocabulary)`` -> (K, E) embeddings (torch); ``predict_scores(images, text,
    image_sizes)`` -> (B, K, h, w) scores or lazy assembled scores, as the torch family.
    """

    def __init__(self, folder: str | os.PathLike, *, providers: Sequence[str] | None = None,
                 session_options=None):
        super().__init__()
        ort = _require("onnxruntime")
        from ..models.registry import build_model, load_config

        folder = Path(folder)
        meta_path = folder / ONNX_META_NAME
        for needed in ("config.json", IMAGE_MODEL_NAME, TEXT_WEIGHTS_NAME, ONNX_META_NAME):
            if not (folder / needed).is_file():
                raise FileNotFoundError(f"{folder}: no {needed}; write the folder with seg.export_onnx()")
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != ONNX_FORMAT or meta.get("format_version", 0) > ONNX_FORMAT_VERSION:
            raise ValueError(f"{meta_path}: not an onepass-ovs ONNX folder this version can read")
        self.config = load_config(folder / "config.json")
        self.meta = meta
        with torch.device("meta"):
            skeleton = build_model(self.config)  # no memory: only the text side is filled in
        self.text_tower = _load_text(skeleton, meta["text_module"], folder / TEXT_WEIGHTS_NAME)
        # the skeleton's text() uses the (now real) text tower; keep it out of .to()/state
        object.__setattr__(self, "_skeleton", skeleton)
        self.assembled = meta["outputs"] == ["mask_logits", "class_probs"]
        self.session = ort.InferenceSession(
            str(folder / IMAGE_MODEL_NAME), sess_options=session_options,
            providers=list(providers) if providers else ["CPUExecutionProvider"],
        )

    def text(self, vocabulary: Sequence[str]) -> torch.Tensor:
        """(K, E) normalised class embeddings (SED: (K, templates, E)), computed in torch."""
        return self._skeleton.text(vocabulary)

    def encode_image(self, images: torch.Tensor, image_sizes=None):
        raise NotImplementedError("the ONNX graph fuses encode and decode; use predict_scores")

    def predict_scores(self, images: torch.Tensor, text_embeddings: torch.Tensor,
                       image_sizes=None):
        """(B, 3, H, W) padded [0, 1] images, (K, E) text -> class scores, as the family."""
        from ..models.assembly import AssembledScores

        if self.meta.get("max_batch") == 1 and images.shape[0] > 1:  # SED: image by image
            sizes = image_sizes if image_sizes is not None else [None] * images.shape[0]
            return torch.cat([
                self.predict_scores(img[None], text_embeddings, None if size is None else [size])
                for img, size in zip(images, sizes, strict=True)
            ])
        b, _, h, w = images.shape
        valid = torch.zeros(b, 1, h, w)
        if image_sizes is None:
            valid.fill_(1)
        else:
            for i, (vh, vw) in enumerate(image_sizes):
                valid[i, :, :vh, :vw] = 1
        feeds = {
            "images": images.detach().float().cpu().numpy(),
            "valid": valid.numpy(),
            "text_embeddings": text_embeddings.detach().float().cpu().numpy(),
        }
        outputs = self.session.run(None, feeds)
        if self.assembled:
            mask_logits, probs = (torch.from_numpy(o) for o in outputs)
            return AssembledScores(mask_logits, None, (h, w), probs=probs)
        return torch.from_numpy(outputs[0])


def from_onnx(cls, folder: str | os.PathLike, *, providers: Sequence[str] | None = None,
              session_options=None):
    """A ``cls`` (Segmenter) whose model runs the exported image graph on onnxruntime."""
    model = OnnxImageModel(folder, providers=providers, session_options=session_options)
    return cls(model, device="cpu", dtype=torch.float32)
