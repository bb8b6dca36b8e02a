"""Text side: vocabulary parsing, prompt templates, learned prompt context and a cache.

A vocabulary is a list of class entries; an entry ``"sofa, couch"`` names one class by
several synonyms whose (normalised) embeddings are averaged. Every entry is encoded once
per model and remembered, so segmenting many images with one vocabulary costs one text
pass.
"""

from __future__ import annotations

import functools
import unicodedata
from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

SINGLE_TEMPLATE = ("a photo of a {}.",)


def imagenet_templates() -> tuple[str, ...]:
    """The 80 prompt templates of CLIP's ImageNet zero-shot ensemble (from open_clip)."""
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    return tuple(t("{}") for t in OPENAI_IMAGENET_TEMPLATES)


def resolve_templates(templates: str | Sequence[str]) -> tuple[str, ...]:
    if isinstance(templates, str):
        if templates == "single":
            return SINGLE_TEMPLATE
        if templates == "imagenet80":
            return imagenet_templates()
        raise ValueError(f"unknown template set {templates!r}; use 'single', 'imagenet80' or a list")
    out = tuple(templates)
    if not out or any(t.count("{}") != 1 for t in out):
        raise ValueError("each prompt template must contain exactly one '{}'")
    return out


def parse_vocabulary(vocabulary: Sequence[str]) -> list[tuple[str, ...]]:
    """Split each entry into its synonyms and validate the whole list (the last few
    vocabularies' results are remembered: a vocabulary of thousands of names is checked
    once, not per image). See :func:`_parse_vocabulary`."""
    if isinstance(vocabulary, (list, tuple)) and all(isinstance(v, str) for v in vocabulary):
        return list(_parse_remembered(tuple(vocabulary)))
    return _parse_vocabulary(vocabulary)


@functools.lru_cache(maxsize=8)
def _parse_remembered(vocabulary: tuple[str, ...]) -> tuple[tuple[str, ...], ...]:
    return tuple(_parse_vocabulary(vocabulary))


def _parse_vocabulary(vocabulary: Sequence[str]) -> list[tuple[str, ...]]:
    """Split each entry into its synonyms and validate the whole list.

    Returns one tuple of synonyms per class, in the given order. Raises ``ValueError``
    for an empty vocabulary, an empty entry, or a duplicated class or synonym (compared
    case-insensitively after Unicode NFC normalisation, as the tokenizer sees them: "café"
    typed with a combining accent is the same name as with a precomposed "é").
    """
    if isinstance(vocabulary, str):
        raise TypeError(
            "vocabulary must be a list of class names, e.g. ['cat', 'sofa, couch'], not a string"
        )
    entries = list(vocabulary)
    if not entries:
        raise ValueError("the vocabulary is empty: give at least one class name")
    parsed: list[tuple[str, ...]] = []
    seen: dict[str, int] = {}
    for index, entry in enumerate(entries):
        if not isinstance(entry, str):
            raise TypeError(f"vocabulary entry {index} is {type(entry).__name__}, not str")
        names = tuple(" ".join(n.split()) for n in entry.split(","))
        names = tuple(n for n in names if n)
        if not names:
            raise ValueError(f"vocabulary entry {index} ({entry!r}) is empty")
        for name in names:
            key = unicodedata.normalize("NFC", name).lower()
            if key in seen:
                other = entries[seen[key]]
                same = "" if other == entry else " (the same name once lower-cased and NFC-normalised)"
                raise ValueError(
                    f"duplicate class name {name!r} in vocabulary entries {seen[key]} "
                    f"({other!r}) and {index} ({entry!r}){same}"
                )
            seen[key] = index
        parsed.append(names)
    return parsed


def _shorten(name: str, keep: int = 60) -> str:
    """A long name as its start and end, for error messages."""
    if len(name) <= keep:
        return name
    return name[: keep - 25] + " ... " + name[-20:]


class TextEncoder(nn.Module):
    """open_clip's text tower with templates, synonyms, learned context and a cache.

    Args:
        clip_model: an open_clip ``CLIP`` (its text tower parts are shared, not copied).
        tokenizer: the matching open_clip tokenizer.
        templates: see :func:`resolve_templates`.
        prompt_length: number of learned context vectors (CoOp); 0 disables them.

    ``forward(vocabulary)`` returns (K, E) L2-normalised class embeddings.
    """

    def __init__(self, clip_model: nn.Module, tokenizer, templates="single", prompt_length=0):
        super().__init__()
        self.token_embedding = clip_model.token_embedding
        self.positional_embedding = clip_model.positional_embedding
        self.transformer = clip_model.transformer
        self.ln_final = clip_model.ln_final
        self.text_projection = clip_model.text_projection
        self.register_buffer("attn_mask", clip_model.attn_mask, persistent=False)
        self.pool_type = getattr(clip_model, "text_pool_type", "argmax")
        self.eos_id = getattr(clip_model, "text_eos_id", None)
        self.tokenizer = tokenizer
        self.templates = resolve_templates(templates)
        width = self.token_embedding.weight.shape[1]
        if prompt_length > 0:
            # CoOp init: small Gaussian noise, as in the paper's released code.
            self.prompt_context = nn.Parameter(torch.randn(prompt_length, width) * 0.02)
        else:
            self.register_parameter("prompt_context", None)
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        # name -> its prompts' token ids when some prompt fills the context (None otherwise)
        self._token_keys: dict[str, tuple | None] = {}
        self.cache_size = 100_000
        self.encode_batch_size = 256

    # -- cache management ------------------------------------------------------------
    def clear_cache(self) -> None:
        self._cache.clear()
        self.__dict__.setdefault("_vocabularies", OrderedDict()).clear()

    def train(self, mode: bool = True):
        self.clear_cache()
        return super().train(mode)

    def _apply(self, fn, *args, **kwargs):
        self.clear_cache()
        return super()._apply(fn, *args, **kwargs)

    def _load_from_state_dict(self, *args, **kwargs):
        self.clear_cache()
        return super()._load_from_state_dict(*args, **kwargs)

    # -- encoding -------------------------------------------------------------------
    @property
    def embed_dim(self) -> int:
        proj = self.text_projection
        if isinstance(proj, nn.Linear):
            return proj.out_features
        return proj.shape[1] if proj is not None else self.token_embedding.weight.shape[1]

    @staticmethod
    def _is_causal(mask: torch.Tensor | None) -> bool:
        """True for an additive (L, L) mask that blocks exactly the positions after each one."""
        if mask is None or mask.ndim != 2 or mask.shape[0] != mask.shape[1]:
            return False
        upper = torch.ones_like(mask, dtype=torch.bool).triu(1)
        return bool(torch.isneginf(mask[upper]).all()) and bool((mask[~upper] == 0).all())

    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        """Encode raw prompt strings -> (P, E) unnormalised, with learned context if any.

        With learned context, the prompt becomes [SOS] ctx_1..ctx_M <prompt tokens> [EOS]:
        M placeholder tokens are tokenised and their embeddings replaced.

        With a causal attention mask and end-token pooling, the transformer runs only up
        to the batch's last end token: a position cannot see the ones after it, so
        dropping the padding after every prompt's end changes nothing but float rounding.
        """
        ctx = self.prompt_context
        device = self.token_embedding.weight.device
        tokens = self.tokenizer(self._prompt_texts(prompts)).to(device)
        cast = self.transformer.get_cast_dtype() if hasattr(self.transformer, "get_cast_dtype") else None
        x = self.token_embedding(tokens)
        if cast is not None:
            x = x.to(cast)
        if ctx is not None:
            m = ctx.shape[0]
            x = torch.cat([x[:, :1], ctx.to(x.dtype).expand(x.shape[0], -1, -1), x[:, 1 + m :]], 1)
        x = x + self.positional_embedding.to(x.dtype)
        attn_mask = self.attn_mask
        end = None  # (P,) index of each prompt's pooled end token
        if self.pool_type == "argmax":
            # the EOT token has the highest id in open_clip's BPE vocabulary
            end = tokens.argmax(dim=-1)
        elif self.pool_type == "eos":
            end = (tokens == self.eos_id).int().argmax(dim=-1)
        if end is not None and self._is_causal(attn_mask):
            # causal: positions after the last end token cannot change the pooled ones
            length = int(end.max()) + 1
            x = x[:, :length]
            attn_mask = attn_mask[:length, :length]
        x = self.transformer(x, attn_mask=attn_mask)
        x = self.ln_final(x)
        if end is not None:
            x = x[torch.arange(x.shape[0], device=device), end]
        elif self.pool_type == "first":
            x = x[:, 0]
        else:
            x = x[:, -1]
        proj = self.text_projection
        if isinstance(proj, nn.Linear):
            x = proj(x)
        elif proj is not None:
            x = x @ proj
        return x

    def _prompt_texts(self, prompts: Sequence[str]) -> list[str]:
        """The strings given to the tokenizer (placeholders for learned context first)."""
        ctx = self.prompt_context
        if ctx is not None:
            return [" ".join(["X"] * ctx.shape[0]) + " " + p for p in prompts]
        return list(prompts)

    def check_distinct(self, names: Sequence[str]) -> None:
        """Raise ``ValueError`` if two names reach the text tower as the same tokens.

        The tokenizer cuts every prompt at the context length, so names that differ only
        after it would get identical embeddings. Only names long enough to fill the context
        are tokenised here (once per name; remembered).
        """
        unknown = [n for n in names if n not in self._token_keys]
        if unknown:
            if len(self._token_keys) > self.cache_size:
                self._token_keys.clear()
            self._token_keys.update(self._token_keys_of(unknown))
        seen: dict[tuple, str] = {}
        for name in names:
            key = self._token_keys.get(name)
            if key is None:
                continue
            if key in seen and seen[key] != name:
                context = self.positional_embedding.shape[0]
                raise ValueError(
                    f"class names {_shorten(seen[key])!r} and {_shorten(name)!r} differ only after the text "
                    f"encoder's {context}-token limit, so the model cannot tell them apart: "
                    "shorten them or make them differ earlier"
                )
            seen[key] = name

    def _token_keys_of(self, names: Sequence[str]) -> dict[str, tuple | None]:
        """name -> token ids of all its prompts if any prompt fills the context, else None."""
        context = self.positional_embedding.shape[0]
        templates = self.templates
        # bare names first (cheap): a prompt can only fill the context if the name alone
        # (plus the longest template) comes close to it
        pad = int(self.tokenizer([""])[0, -1])
        overhead = max(
            int((self.tokenizer(self._prompt_texts([t.format("")]))[0] != pad).sum())
            for t in templates
        )
        bare = self.tokenizer(list(names))
        lengths = (bare != pad).sum(1).tolist()
        keys: dict[str, tuple | None] = {}
        for name, length in zip(names, lengths, strict=True):
            if length + overhead < context:
                keys[name] = None
                continue
            tokens = self.tokenizer(self._prompt_texts([t.format(name) for t in templates]))
            full = bool((tokens[:, -1] != pad).any())
            keys[name] = tuple(tokens.flatten().tolist()) if full else None
        return keys

    def encode_names(self, names: Sequence[str]) -> torch.Tensor:
        """(len(names), E) normalised embeddings, each the mean over all templates."""
        templates = self.templates
        prompts = [t.format(name) for name in names for t in templates]
        chunks = []
        for start in range(0, len(prompts), self.encode_batch_size):
            chunks.append(self.encode_prompts(prompts[start : start + self.encode_batch_size]))
        emb = F.normalize(torch.cat(chunks).float(), dim=-1)
        emb = emb.view(len(names), len(templates), -1).mean(1)
        return F.normalize(emb, dim=-1)

    def forward(self, vocabulary: Sequence[str]) -> torch.Tensor:
        """(K, E) normalised class embeddings for a vocabulary (synonyms averaged).

        The last few vocabularies are remembered whole, so segmenting many images with a
        vocabulary of thousands of classes does not rebuild its (K, E) matrix each time.
        """
        use_cache = not (self.training and torch.is_grad_enabled())
        vocabularies = self.__dict__.setdefault("_vocabularies", OrderedDict())
        key = tuple(vocabulary) if not isinstance(vocabulary, str) else None
        if use_cache and key in vocabularies:
            vocabularies.move_to_end(key)
            out = vocabularies[key]
            if out.is_inference() and not torch.is_inference_mode_enabled():
                out = out.clone()  # an inference tensor cannot enter autograd's graph
            return out
        classes = parse_vocabulary(vocabulary)
        names = sorted({n for syn in classes for n in syn})
        self.check_distinct(names)
        if use_cache:
            missing = [n for n in names if n not in self._cache]
        else:
            missing = names
        fresh = {}
        if missing:
            with torch.set_grad_enabled(torch.is_grad_enabled() and not use_cache):
                emb = self.encode_names(missing)
            fresh = dict(zip(missing, emb, strict=True))
            if use_cache:
                for name, e in fresh.items():
                    self._cache[name] = e.detach()
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
        lookup = fresh if not use_cache else self._cache
        rows = []
        for synonyms in classes:
            e = torch.stack([lookup[n] for n in synonyms]).mean(0)
            rows.append(F.normalize(e, dim=-1))
        out = torch.stack(rows)
        if use_cache and key is not None:
            vocabularies[key] = out
            while len(vocabularies) > 8:
                vocabularies.popitem(last=False)
        return out
