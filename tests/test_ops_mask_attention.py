"""mask_guided_attention: values and gradients against an independent float64 formula."""

from __future__ import annotations

import pytest
import torch

from onepass_ovs.ops import mask_guided_attention
from ops_helpers import TOLERANCE, max_relative_error, reference_grads, reference_mask_attention

CUDA = torch.cuda.is_available()


def make_inputs(batch, heads, tokens, mask_dim, head_dim, dtype=torch.float32, seed=0,
                mask_gain=1.0):  # fmt: skip
    gen = torch.Generator().manual_seed(seed)
    masks = torch.rand(batch, tokens, mask_dim, generator=gen) * mask_gain
    values = torch.randn(batch, heads, tokens, head_dim, generator=gen)
    return masks.to(dtype).requires_grad_(True), values.to(dtype).requires_grad_(True)


def assert_matches_reference(m, v, scale, backend, tolerance):
    out = mask_guided_attention(m, v, scale=scale, backend=backend)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.device, out.dtype)
    grad_m, grad_v = torch.autograd.grad(out, (m, v), grad_out)
    expected_out, (expected_m, expected_v) = reference_grads(
        lambda masks, values: reference_mask_attention(masks, values, scale), (m, v), grad_out
    )
    assert out.shape == v.shape and out.dtype == v.dtype
    assert max_relative_error(out, expected_out) < tolerance, "output"
    assert grad_m.shape == m.shape and max_relative_error(grad_m, expected_m) < tolerance, "m"
    assert grad_v.shape == v.shape and max_relative_error(grad_v, expected_v) < tolerance, "v"


# (B, H, T, N, D): N = 100 as in DeOP (padded to 104 for SDPA), odd T, N = 1, T = 1.
SHAPES = [
    (2, 3, 17, 100, 16),
    (1, 2, 33, 10, 64),
    (2, 1, 9, 1, 32),
    (1, 4, 1, 7, 16),
]


@pytest.mark.parametrize("backend", ["torch", "sdpa"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_reference_fp32(backend, shape):
    m, v = make_inputs(*shape)
    assert_matches_reference(m, v, 0.1, backend, TOLERANCE[torch.float32])


@pytest.mark.parametrize("backend", ["torch", "sdpa"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(backend, dtype):
    m, v = make_inputs(2, 3, 17, 100, 16, dtype=dtype, seed=2)
    assert_matches_reference(m, v, 0.1, backend, TOLERANCE[dtype])


def test_float64_gradcheck_torch_backend():
    m, v = make_inputs(1, 2, 5, 3, 4, dtype=torch.float64, seed=3)
    assert torch.autograd.gradcheck(
        lambda masks, values: mask_guided_attention(masks, values, scale=0.7, backend="torch"),
        (m, v),
    )


@pytest.mark.parametrize("backend", ["torch", "sdpa"])
def test_default_scale_is_one(backend):
    m, v = make_inputs(1, 2, 6, 5, 8, seed=4)
    out = mask_guided_attention(m, v, backend=backend)
    assert max_relative_error(out, reference_mask_attention(m, v, 1.0)) < 1e-5
    assert max_relative_error(out, reference_mask_attention(m, v, 0.5)) > 1e-2


@pytest.mark.parametrize("backend", ["torch", "sdpa"])
def test_large_logits_are_stable(backend):
    # Masks scaled so that logits reach ~1e5: a softmax without max subtraction overflows.
    m, v = make_inputs(1, 2, 12, 100, 16, seed=5, mask_gain=30.0)
    out = mask_guided_attention(m, v, backend=backend)
    out.sum().backward()
    assert torch.isfinite(m.grad).all() and torch.isfinite(v.grad).all()
    assert max_relative_error(out, reference_mask_attention(m, v, 1.0)) < 1e-5


def test_one_attention_matrix_for_all_heads():
    # With identical value heads, every head must produce the same output.
    m, v = make_inputs(1, 1, 10, 6, 8, seed=6)
    v4 = v.detach().expand(1, 4, 10, 8).contiguous()
    out = mask_guided_attention(m.detach(), v4, backend="torch")
    for head in range(1, 4):
        torch.testing.assert_close(out[:, head], out[:, 0])


def test_auto_on_cpu_uses_dense_torch():
    m, v = make_inputs(2, 3, 17, 100, 16, seed=7)
    assert torch.equal(mask_guided_attention(m, v), mask_guided_attention(m, v, backend="torch"))


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (lambda m, v: (m[0], v), r"m must be \(B, T, N\)"),
        (lambda m, v: (m, v[0]), r"v must be \(B, H, T, D\)"),
        (lambda m, v: (m[:, :3], v), "must agree on B and T"),
        (lambda m, v: (m[:1], v), "must agree on B and T"),
        (lambda m, v: (m[..., :0], v), "T and N must be at least 1"),
        (lambda m, v: (m.int(), v), "m must be floating point"),
        (lambda m, v: (m, v.to("meta")), "must be on one device"),
        (lambda m, v: (m.tolist(), v), "m must be a torch.Tensor"),
    ],
)
def test_bad_inputs_raise_clear_errors(args, match):
    m, v = make_inputs(2, 3, 5, 4, 8)
    with pytest.raises((ValueError, TypeError), match=match):
        mask_guided_attention(*args(m.detach(), v.detach()))


def test_unknown_backend_raises():
    m, v = make_inputs(1, 1, 3, 2, 8)
    with pytest.raises(ValueError, match="unknown backend 'flash'; expected one of auto, torch"):
        mask_guided_attention(m, v, backend="flash")


def test_triton_backend_points_to_sdpa():
    m, v = make_inputs(1, 1, 3, 2, 8)
    with pytest.raises(ValueError, match="no Triton kernel.*backend='sdpa'"):
        mask_guided_attention(m, v, backend="triton")


# ------------------------------------------------------------- CUDA only


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_cuda_sdpa_matches_reference(dtype):
    inputs = make_inputs(2, 12, 1025, 100, 64, dtype=dtype)
    m, v = (t.detach().cuda().requires_grad_(True) for t in inputs)
    assert_matches_reference(m, v, 0.1, "auto", TOLERANCE[dtype])


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_cuda_sdpa_never_builds_the_token_matrix():
    tokens = 8193
    m, v = (t.detach().cuda().half() for t in make_inputs(1, 12, tokens, 100, 64))
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = mask_guided_attention(m, v, backend="sdpa")
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    output = out.numel() * out.element_size()  # the result itself, (B, H, T, D)
    assert extra < 2 * output + 0.1 * tokens * tokens * 2, (extra, output)  # vs one (T, T)
