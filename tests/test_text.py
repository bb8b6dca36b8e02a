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
