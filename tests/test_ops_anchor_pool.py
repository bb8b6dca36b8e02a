"""anchor_pool: values and gradients against an independent float64 formula.

The Triton kernels run on CPU tensors in Triton's interpreter. Triton 3.x fixes
interpreter or compiled mode when triton is first imported (it wraps its own ``tl.sum``,
``tl.max``... with ``@jit`` then), so the interpreter tests (``test_triton_interpreted_*``)
run in this process only when it was started with ``TRITON_INTERPRET=1``::

    TRITON_INTERPRET=1 pytest tests/test_ops_anchor_pool.py

Otherwise ``test_kernels_in_interpreter_child_process`` runs them in a child process with
the variable set, so a plain ``pytest`` covers them too, whatever imported triton before.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch

from onepass_ovs.ops import anchor_pool
from onepass_ovs.ops._torch_anchor_pool import anchor_pool_chunked
from ops_helpers import (
    TOLERANCE,
    make_anchor_inputs,
    max_relative_error,
    reference_anchor_pool,
    reference_grads,
)

CUDA = torch.cuda.is_available()
INTERPRETED_HERE = os.environ.get("TRITON_INTERPRET", "0") == "1"
interpreted = pytest.mark.skipif(
    not INTERPRETED_HERE, reason="runs in test_kernels_in_interpreter_child_process"
)


def _scaled_reference(scale):
    return lambda q, k, v, gate: reference_anchor_pool(q, k, v, gate, scale)


def assert_matches_reference(inputs, out_fn, scale, tolerance):
    """Checks the output of ``out_fn(*inputs)`` and all four gradients."""
    out = out_fn(*inputs)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.device, out.dtype)
    grads = torch.autograd.grad(out, inputs, grad_out)
    expected_out, expected_grads = reference_grads(_scaled_reference(scale), inputs, grad_out)
    assert out.dtype == inputs[0].dtype and out.shape == expected_out.shape
    assert max_relative_error(out, expected_out) < tolerance, "output"
    for name, grad, expected in zip(("q", "k", "v", "gate"), grads, expected_grads, strict=True):
        assert grad.shape == expected.shape and grad.dtype == inputs[0].dtype
        assert torch.isfinite(grad).all(), name
        assert max_relative_error(grad, expected) < tolerance, f"grad {name}"


# ---------------------------------------------------------------- torch backend

# (B, H, N, L, D): odd L, N = 1, L = 1, N above one kernel block, L above one chunk.
TORCH_SHAPES = [
    (2, 3, 5, 37, 32),
    (1, 2, 1, 1, 64),
    (1, 1, 1, 19, 128),
    (2, 2, 130, 9, 32),
    (1, 2, 3, 1537, 32),
]


@pytest.mark.parametrize("shape", TORCH_SHAPES)
def test_torch_backend_matches_reference_fp32(shape):
    inputs = make_anchor_inputs(*shape)
    scale = 0.3
    assert_matches_reference(
        inputs, lambda *t: anchor_pool(*t, scale=scale, backend="torch"), scale,
        TOLERANCE[torch.float32],
    )  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("keys", [70, 1100])  # dense path, chunked path
def test_torch_backend_half_precision(dtype, keys):
    inputs = make_anchor_inputs(1, 2, 7, keys, 32, dtype=dtype)
    assert_matches_reference(
        inputs, lambda *t: anchor_pool(*t, backend="torch"), 32**-0.5, TOLERANCE[dtype]
    )


@pytest.mark.parametrize("chunk", [1, 5, 13, 64])
def test_chunked_online_softmax_gradcheck(chunk):
    # float64 finite differences: checks the hand-written backward of the chunked path,
    # which is the same math as the Triton backward, with chunks that split L unevenly.
    inputs = make_anchor_inputs(2, 2, 3, 13, 4, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda *t: anchor_pool_chunked(*t, 0.7, chunk), inputs, eps=1e-6, atol=1e-8
    )


def test_default_scale_is_inverse_sqrt_head_dim():
    inputs = make_anchor_inputs(1, 2, 4, 16, 64, seed=3)
    out = anchor_pool(*inputs, backend="torch")
    expected = reference_anchor_pool(*inputs, 64**-0.5)
    assert max_relative_error(out, expected) < TOLERANCE[torch.float32]
    unscaled = reference_anchor_pool(*inputs, 1.0)
    assert max_relative_error(out, unscaled) > 1e-2


def test_gate_multiplies_after_softmax_without_renormalising():
    q, k, v, gate = make_anchor_inputs(1, 2, 4, 16, 32, seed=4)
    half = torch.full_like(gate, 0.5)
    ones = torch.ones_like(gate)
    out_half = anchor_pool(q, k, v, half, backend="torch")
    out_ones = anchor_pool(q, k, v, ones, backend="torch")
    # A renormalised heatmap would make a constant gate a no-op.
    torch.testing.assert_close(out_half, 0.5 * out_ones)


@pytest.mark.parametrize("keys", [16, 1100])
def test_all_zero_gate_rows_give_zeros_and_finite_grads(keys):
    q, k, v, gate = make_anchor_inputs(2, 2, 4, keys, 32, seed=5)
    with torch.no_grad():
        gate[0, 1] = 0.0
        gate[1, 3] = 0.0
    out = anchor_pool(q, k, v, gate, backend="torch")
    assert torch.count_nonzero(out[0, :, 1]) == 0 and torch.count_nonzero(out[1, :, 3]) == 0
    out.sum().backward()
    for tensor in (q, k, v, gate):
        assert torch.isfinite(tensor.grad).all()
    assert torch.count_nonzero(q.grad[0, :, 1]) == 0  # nothing flows through a zero gate
    assert torch.count_nonzero(gate.grad[0, 1]) > 0  # but the gate itself still learns


@pytest.mark.parametrize("keys", [40, 1100])
def test_large_logits_are_stable(keys):
    # logits around +-1e4: a softmax without max subtraction overflows.
    inputs = make_anchor_inputs(1, 2, 3, keys, 32, seed=6, logit_gain=3e3)
    out = anchor_pool(*inputs, scale=1.0, backend="torch")
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in inputs)
    expected = reference_anchor_pool(*inputs, 1.0)
    assert max_relative_error(out, expected) < TOLERANCE[torch.float32]


@pytest.mark.parametrize("keys", [10, 1100])  # dense path, chunked path
def test_broadcast_gate_gets_reduced_gradient(keys):
    q, k, v, _ = make_anchor_inputs(3, 2, 4, keys, 32, seed=7)
    shared_gate = torch.rand(1, 4, keys, requires_grad=True)
    gate = shared_gate.expand(3, 4, keys)
    out = anchor_pool(q, k, v, gate, backend="torch")
    out.sum().backward()
    grad_out = torch.ones_like(out)
    expected = reference_grads(_scaled_reference(32**-0.5), (q, k, v, gate), grad_out)[1][3]
    expected = expected.sum(dim=0, keepdim=True)
    assert max_relative_error(shared_gate.grad, expected) < TOLERANCE[torch.float32]


@interpreted
def test_triton_interpreted_auto_on_cpu_stays_on_torch(monkeypatch):
    from onepass_ovs.ops import _triton_anchor_pool

    def fail(*args, **kwargs):
        raise AssertionError("auto must not run the Triton interpreter on CPU tensors")

    monkeypatch.setattr(_triton_anchor_pool, "anchor_pool_triton", fail)
    inputs = make_anchor_inputs(1, 2, 3, 20, 32)
    out = anchor_pool(*inputs)
    assert torch.equal(out, anchor_pool(*inputs, backend="torch"))


# --------------------------------------------------------------- errors


def _inputs(batch=1, heads=2, queries=3, keys=5, head_dim=32, dtype=torch.float32):
    return make_anchor_inputs(batch, heads, queries, keys, head_dim, dtype=dtype)


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda q, k, v, g: (q[0], k, v, g), r"q must be \(B, H, N, D\)"),
        (lambda q, k, v, g: (q, k, v, g[:, None]), r"gate must be \(B, N, L\)"),
        (lambda q, k, v, g: (q, k, v[:, :, :4], g), "k and v must have the same shape"),
        (lambda q, k, v, g: (q[..., :16], k, v, g), "must agree on B, H and D"),
        (lambda q, k, v, g: (q, k[:, :1], v[:, :1], g), "must agree on B, H and D"),
        (lambda q, k, v, g: (q, k, v, g[..., :4]), r"gate must be \(B, N, L\) = \(1, 3, 5\)"),
        (lambda q, k, v, g: (q, k[:, :, :0], v[:, :, :0], g[..., :0]), "L must be at least 1"),
        (lambda q, k, v, g: (q.double(), k, v, g), "must share one dtype"),
        (lambda q, k, v, g: (q.int(), k.int(), v.int(), g), "must be floating point"),
        (lambda q, k, v, g: (q, k, v, g.to("meta")), "on one device"),
        (lambda q, k, v, g: (q.tolist(), k, v, g), "q must be a torch.Tensor"),
    ],
)
def test_bad_inputs_raise_clear_errors(mutate, match):
    with pytest.raises((ValueError, TypeError), match=match):
        anchor_pool(*mutate(*_inputs()))


def test_unknown_backend_raises():
    with pytest.raises(ValueError, match="unknown backend 'cuda'; expected one of auto, torch"):
        anchor_pool(*_inputs(), backend="cuda")


@pytest.mark.skipif(INTERPRETED_HERE, reason="needs triton in compiled mode")
def test_triton_on_cpu_without_interpreter_raises(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="needs CUDA tensors.*TRITON_INTERPRET=1"):
        anchor_pool(*_inputs(), backend="triton")


@pytest.mark.skipif(INTERPRETED_HERE, reason="needs triton in compiled mode")
def test_interpreter_requested_after_triton_import_raises(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # too late: triton is already imported
    with pytest.raises(RuntimeError, match="triton was imported before"):
        anchor_pool(*_inputs(), backend="triton")


@interpreted
def test_triton_interpreted_unsupported_head_dim_raises():
    with pytest.raises(ValueError, match=r"D in \(16, 32, 64, 128\).*got D=48"):
        anchor_pool(*_inputs(head_dim=48), backend="triton")


def test_import_does_not_import_triton():
    code = "import sys, onepass_ovs.ops; assert 'triton' not in sys.modules, 'triton imported'"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


# ------------------------------------------------- Triton kernels, interpreted on CPU


@pytest.mark.skipif(INTERPRETED_HERE, reason="the interpreter tests run in this process")
def test_kernels_in_interpreter_child_process():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider",
         "-k", "triton_interpreted"],
        capture_output=True, text=True, env=env, cwd=os.path.dirname(__file__),
    )  # fmt: skip
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-2000:]
    passed = re.search(r"(\d+) passed", summary)
    assert passed and int(passed.group(1)) >= 10 and "skipped" not in summary, summary


# (B, H, N, L, D, num_splits): odd L; N = 1 with L = 1; several splits of L merged;
# N above one query block (several blocks, key/value gradients accumulated).
TRITON_CASES = [
    (2, 2, 5, 37, 32, None),
    (1, 2, 1, 1, 64, None),
    (1, 1, 20, 100, 128, 3),
    (1, 2, 40, 23, 32, 2),
]


@pytest.mark.parametrize("case", TRITON_CASES, ids=str)
@interpreted
def test_triton_interpreted_matches_reference_fp32(case):
    from onepass_ovs.ops._triton_anchor_pool import anchor_pool_triton

    *shape, num_splits = case
    inputs = make_anchor_inputs(*shape, seed=11)
    assert_matches_reference(
        inputs, lambda *t: anchor_pool_triton(*t, 0.3, num_splits), 0.3,
        TOLERANCE[torch.float32],
    )  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("queries", [7, 130])  # one query block; two (16-bit block is 128)
@interpreted
def test_triton_interpreted_half_precision(dtype, queries):
    inputs = make_anchor_inputs(1, 2, queries, 45, 32, dtype=dtype, seed=12)
    assert_matches_reference(
        inputs, lambda *t: anchor_pool(*t, backend="triton"), 32**-0.5, TOLERANCE[dtype]
    )


@interpreted
def test_triton_interpreted_zero_gate_rows_and_large_logits():
    from onepass_ovs.ops._triton_anchor_pool import anchor_pool_triton

    q, k, v, gate = make_anchor_inputs(1, 2, 6, 50, 32, seed=13, logit_gain=3e3)
    with torch.no_grad():
        gate[0, 2] = 0.0
    out = anchor_pool_triton(q, k, v, gate, 1.0, 2)
    assert torch.count_nonzero(out[0, :, 2]) == 0
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v, gate))
    assert torch.count_nonzero(q.grad[0, :, 2]) == 0 and torch.count_nonzero(gate.grad[0, 2]) > 0
    expected = reference_anchor_pool(q, k, v, gate, 1.0)
    assert max_relative_error(out, expected) < TOLERANCE[torch.float32]


@interpreted
def test_triton_interpreted_partial_gradients_and_strided_inputs():
    # Non-contiguous q/k/v (a transposed layout, as a head split produces) and a gate
    # without gradient: the kernels read strides, and skip the gate and query gradients.
    q, k, v, gate = make_anchor_inputs(2, 5, 3, 29, 32, seed=14)
    q_strided = q.detach().transpose(1, 2).contiguous().transpose(1, 2)
    k_strided = k.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_(True)
    v_strided = v.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_(True)
    assert not q_strided.is_contiguous()
    gate = gate.detach()
    out = anchor_pool(q_strided, k_strided, v_strided, gate, backend="triton")
    grad_out = torch.randn_like(out)
    grad_k, grad_v = torch.autograd.grad(out, (k_strided, v_strided), grad_out)
    expected_out, expected = reference_grads(_scaled_reference(32**-0.5), (q, k, v, gate), grad_out)
    assert max_relative_error(out, expected_out) < TOLERANCE[torch.float32]
    assert max_relative_error(grad_k, expected[1]) < TOLERANCE[torch.float32]
    assert max_relative_error(grad_v, expected[2]) < TOLERANCE[torch.float32]


# ------------------------------------------------------------- CUDA only


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(2, 8, 100, 4096, 64), (1, 8, 100, 1000, 128), (1, 2, 1, 1, 32)])
def test_cuda_triton_matches_reference(dtype, shape):
    inputs = [
        t.detach().cuda().requires_grad_(True) for t in make_anchor_inputs(*shape, dtype=dtype)
    ]
    assert_matches_reference(
        inputs, lambda *t: anchor_pool(*t, backend="triton"), shape[-1] ** -0.5, TOLERANCE[dtype]
    )


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_cuda_triton_memory_does_not_grow_with_n_times_l():
    """The fused kernel's extra memory is flat in L (its split buffers depend on the GPU's
    multiprocessor count, not on L) and far below one dense (B, H, N, L) score tensor."""

    def extra_bytes(seq_l):
        q, k, v, gate = (t.detach().cuda().half() for t in make_anchor_inputs(1, 8, 100, seq_l, 64))
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        anchor_pool(q, k, v, gate, backend="triton")
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base

    small, large = extra_bytes(16384), extra_bytes(65536)
    assert large <= 1.05 * small + 2**16, (small, large)  # flat in L
    dense_scores = 8 * 100 * 65536 * 4  # one fp32 (B, H, N, L) tensor
    assert large < 0.05 * dense_scores, large
