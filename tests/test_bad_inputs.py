"""Bad inputs to the Python API give clear errors naming the input (issue 12)."""

from __future__ import annotations

import struct
import unicodedata
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

import onepass_ovs
from onepass_ovs import Segmenter, images

VOCAB = ["cat", "sofa, couch", "background"]


def write_png_header(path: Path, width: int, height: int) -> Path:
    """A PNG that claims width x height pixels (header only): what a decompression bomb
    looks like to Pillow before it decodes anything."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))
    return path


def test_empty_image_array_is_a_clear_error(tiny_segmenter):
    for empty in (np.zeros((0, 8, 3), np.uint8), np.zeros((8, 0), np.uint8), torch.zeros(3, 0, 5)):
        with pytest.raises(ValueError, match="no pixels"):
            tiny_segmenter.segment(empty, VOCAB)


def test_bad_item_in_a_list_is_named(tiny_segmenter, rgb_image, tmp_path):
    with pytest.raises(ValueError, match=r"image 2 of the list: .*no pixels"):
        tiny_segmenter.segment([rgb_image, rgb_image, rgb_image[:0]], VOCAB)
    with pytest.raises(TypeError, match=r"image 1 of the list: unsupported image type"):
        tiny_segmenter.segment([rgb_image, 7], VOCAB)
    # the index counts across batches, and files are named as well
    missing = tmp_path / "gone.png"
    with pytest.raises(FileNotFoundError, match=r"image 5 of the list: .*gone\.png"):
        tiny_segmenter.segment([rgb_image] * 5 + [missing], VOCAB, batch_size=2)


def test_decompression_bomb_is_our_error_naming_the_file(tiny_segmenter, tmp_path):
    bomb = write_png_header(tmp_path / "bomb.png", 100_000, 100_000)
    with pytest.raises(images.ImageTooLargeError, match=r"bomb\.png.*MAX_IMAGE_PIXELS") as info:
        tiny_segmenter.segment(bomb, VOCAB)
    assert isinstance(info.value, ValueError)
    assert "\n" not in str(info.value)
    with pytest.raises(images.ImageTooLargeError, match="image 1 of the list"):
        tiny_segmenter.segment([np.zeros((8, 8, 3), np.uint8), bomb], VOCAB)


def test_names_equal_after_unicode_normalisation_are_duplicates(tiny_segmenter, rgb_image):
    composed = unicodedata.normalize("NFC", "café")
    decomposed = unicodedata.normalize("NFD", "café")
    assert composed != decomposed
    with pytest.raises(ValueError, match="duplicate class name.*NFC"):
        tiny_segmenter.segment(rgb_image, [composed, decomposed])
    with pytest.raises(ValueError, match="duplicate"):
        tiny_segmenter.segment(rgb_image, [f"tea, {composed}", decomposed.upper()])


def test_names_differing_only_after_the_context_length_are_refused(tiny_segmenter, rgb_image):
    context = tiny_segmenter.model.text.positional_embedding.shape[0]
    prefix = "very " * (context + 5)
    with pytest.raises(ValueError, match=rf"differ only after .*{context}-token"):
        tiny_segmenter.segment(rgb_image, [prefix + "red circle", prefix + "blue square", "cat"])
    # long names that differ early are fine, and identical embeddings are what was refused
    ok = tiny_segmenter.segment(rgb_image, ["red " + prefix, "blue " + prefix, "cat"])
    assert ok.label_map.shape == rgb_image.shape[:2]
    text = tiny_segmenter.model.text
    text.clear_cache()
    same = text.encode_names([prefix + "red circle", prefix + "blue square"])
    torch.testing.assert_close(same[0], same[1])


def test_save_pretrained_keeps_fp16_weights(tmp_path):
    from safetensors.torch import load_file

    half = Segmenter.from_config("deop-tiny", seed=0, dtype="float16")
    half.save_pretrained(tmp_path / "half")
    size = (tmp_path / "half" / "model.safetensors").stat().st_size
    loaded = Segmenter.from_pretrained(tmp_path / "half", device="cpu")  # runs in fp32
    assert next(loaded.model.parameters()).dtype == torch.float32
    loaded.save_pretrained(tmp_path / "again")
    assert (tmp_path / "again" / "model.safetensors").stat().st_size == size
    again = load_file(str(tmp_path / "again" / "model.safetensors"))
    first = load_file(str(tmp_path / "half" / "model.safetensors"))
    assert {k: v.dtype for k, v in again.items()} == {k: v.dtype for k, v in first.items()}
    assert all(torch.equal(again[k], first[k]) for k in first)
    # a weight changed beyond fp16's precision is saved as it is, never rounded
    name, param = next((n, p) for n, p in loaded.model.named_parameters() if p.numel() > 10)
    with torch.no_grad():
        param.add_(1e-5)
    loaded.save_pretrained(tmp_path / "tuned")
    tuned = load_file(str(tmp_path / "tuned" / "model.safetensors"))
    assert tuned[name].dtype == torch.float32
    torch.testing.assert_close(tuned[name], param.detach(), rtol=0, atol=0)


def test_package_ships_py_typed():
    assert (Path(onepass_ovs.__file__).parent / "py.typed").is_file()
