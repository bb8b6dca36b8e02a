"""Shared fixtures: tiny models built once per session, on CPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


@pytest.fixture(scope="session")
def tiny_segmenter():
    from onepass_ovs import Segmenter

    seg = Segmenter.from_config("deop-tiny", device="cpu", seed=0)
    # make the void and proposals non-trivial so label maps are not constant
    return seg


@pytest.fixture(scope="session")
def tiny_saved(tiny_segmenter, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_model")
    tiny_segmenter.save_pretrained(folder)
    return folder


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture
def rgb_image(rng):
    return (rng.random((45, 61, 3)) * 255).astype(np.uint8)
