"""Vocabulary parsing and the text encoder (templates, synonyms, learned context, cache)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from onepass_ovs.config import ClipConfig
from onepass_ovs.models.towers import TINY_CLIP_CFG, create_clip, create_tokenizer
from onepass_ovs.text import TextEncoder, parse_vocabulary, resolve_templates


def test_parse_vocabulary_synonyms_and_order():
    assert parse_vocabulary(["cat", " sofa ,  couch", "tv,television"]) == [
        ("cat",), ("sofa", "couch"), ("tv", "television")
    ]


@pytest.mark.parametrize(
    ("vocab", "message"),
    [
        ([], "empty"),
        (["cat", " , "], "entry 1"),
        (["cat", "Cat"], "duplicate class name 'Cat'"),
        (["sofa, couch", "couch"], "duplicate class name 'couch'"),
    ],
)
def test_parse_vocabulary_errors(vocab, message):
    with pytest.raises(ValueError, match=message):
        parse_vocabulary(vocab)


def test_parse_vocabulary_rejects_plain_string():
    with pytest.raises(TypeError, match="list of class names"):
        parse_vocabulary("cat, dog")


def test_templates():
    assert resolve_templates("single") == ("a photo of a {}.",)
    t80 = resolve_templates("imagenet80")
    assert len(t80) == 80 and all(t.count("{}") == 1 for t in t80)
    with pytest.raises(ValueError):
        resolve_templates(["no placeholder"])


@pytest.fixture(scope="module")
def clip_and_encoder():
    torch.manual_seed(0)
    clip = create_clip(ClipConfig(model_cfg=copy.deepcopy(TINY_CLIP_CFG))).eval()
    encoder = TextEncoder(clip, create_tokenizer(TINY_CLIP_CFG)).eval()
    return clip, encoder


@torch.no_grad()
def test_matches_open_clip_encode_text(clip_and_encoder):
    clip, encoder = clip_and_encoder
    tok = create_tokenizer(TINY_CLIP_CFG)
    ref = F.normalize(clip.encode_text(tok(["a photo of a cat.", "a photo of a dog."])), dim=-1)
    torch.testing.assert_close(encoder(["cat", "dog"]), ref, atol=1e-6, rtol=1e-5)


@torch.no_grad()
def test_synonyms_are_averaged(clip_and_encoder):
    _, encoder = clip_and_encoder
    single = encoder(["sofa", "couch"])
    both = encoder(["sofa, couch"])
    torch.testing.assert_close(both[0], F.normalize(single.mean(0), dim=-1))


@torch.no_grad()
def test_each_entry_encoded_once(clip_and_encoder, monkeypatch):
    _, encoder = clip_and_encoder
    encoder.clear_cache()
    seen = []
    original = encoder.encode_names

    def counting(names):
        seen.extend(names)
        return original(names)

    monkeypatch.setattr(encoder, "encode_names", counting)
    a = encoder(["cat", "dog"])
    b = encoder(["dog", "cat", "bird"])
    assert sorted(seen) == ["bird", "cat", "dog"]
    torch.testing.assert_close(a[0], b[1])


def test_learned_context_changes_embeddings_and_gets_gradients():
    torch.manual_seed(0)
    clip = create_clip(ClipConfig(model_cfg=copy.deepcopy(TINY_CLIP_CFG)))
    plain = TextEncoder(clip, create_tokenizer(TINY_CLIP_CFG)).train()
    coop = TextEncoder(clip, create_tokenizer(TINY_CLIP_CFG), prompt_length=4).train()
    with torch.no_grad():
        assert not torch.allclose(plain(["cat"]), coop(["cat"]))
    coop(["cat", "dog"]).sum().backward()
    assert coop.prompt_context.grad is not None and coop.prompt_context.grad.abs().sum() > 0


# -- the text transformer runs only up to the batch's last end token ---------------------------


def _long_context_clip(seed: int = 0):
    """The tiny CLIP with CLIP's real 77-token context (so truncation has padding to drop)."""
    cfg = copy.deepcopy(TINY_CLIP_CFG)
    cfg["text_cfg"].update(context_length=77, layers=2)
    torch.manual_seed(seed)
    clip = create_clip(ClipConfig(model_cfg=cfg)).eval()
    return clip, create_tokenizer(cfg)


def _record_lengths(encoder):
    lengths = []
    handle = encoder.transformer.register_forward_pre_hook(
        lambda module, args: lengths.append(args[0].shape[1])
    )
    return lengths, handle


@torch.no_grad()
def test_prompts_encode_as_the_full_length_pass_up_to_the_last_end_token():
    clip, tokenizer = _long_context_clip()
    encoder = TextEncoder(clip, tokenizer).eval()
    prompts = ["a photo of a cat.", "a dog.", "a blurry photo of the big wooden dining table."]
    tokens = tokenizer(prompts)
    lengths, handle = _record_lengths(encoder)
    try:
        ours = encoder.encode_prompts(prompts)
    finally:
        handle.remove()
    # the pass stopped at the longest prompt's end token, well short of the 77 positions
    assert lengths == [int(tokens.argmax(-1).max()) + 1] and lengths[0] < 20
    reference = clip.encode_text(tokens)  # open_clip's own full 77-position pass
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_truncated_pass_with_learned_context_matches_a_full_length_batch():
    clip, tokenizer = _long_context_clip(seed=1)
    encoder = TextEncoder(clip, tokenizer, prompt_length=4).eval()
    short = ["a photo of a cat.", "a dog."]
    # a prompt that fills the whole context forces the full-length pass for its batch
    filler = "a photo of " + " ".join(["a"] * 80) + "."
    lengths, handle = _record_lengths(encoder)
    try:
        alone = encoder.encode_prompts(short)
        full = encoder.encode_prompts([*short, filler])[: len(short)]
    finally:
        handle.remove()
    assert lengths[1] == 77 and lengths[0] < 20
    torch.testing.assert_close(alone, full, atol=1e-5, rtol=1e-5)


def test_no_truncation_without_a_causal_mask():
    clip, tokenizer = _long_context_clip()
    encoder = TextEncoder(clip, tokenizer).eval()
    encoder.attn_mask = torch.zeros_like(encoder.attn_mask)  # every position sees every one
    lengths, handle = _record_lengths(encoder)
    try:
        with torch.no_grad():
            encoder.encode_prompts(["a cat."])
    finally:
        handle.remove()
    assert lengths == [77]
