"""Triton kernels of ``anchor_pool``: one pass over L with an online softmax.

Imported only when the Triton backend runs (``import triton`` is at the top of this
module). Math and notation: see ``_torch_anchor_pool`` (same algorithm, in torch).

Layout of the work, for N (queries, ~100) much smaller than L (keys, thousands):

* forward: one program per (query block, batch*head, split of L). With few query blocks
  a single pass over L would occupy only B*H programs, so L is split into chunks
  (flash-decoding style) whose partial (max, denominator, numerator) are merged by a
  second small kernel. With one split the first kernel writes the output directly.
* backward, keys/values/gate: one program per (key block, batch[, head]). The gate is
  shared by the heads, so when its gradient is needed one program loops over all heads
  and sums them in registers: deterministic, no atomics.
* backward, queries: one program per (query block, batch*head, split of L), partial
  sums over splits reduced in torch (a buffer of size independent of L).

Probabilities are recomputed from the saved base-2 log-sum-exp; the backward never holds
more than a (BLOCK_N, BLOCK_L) tile of them.

Under ``TRITON_INTERPRET=1`` (set before triton is imported) the same kernels run on CPU
tensors in Triton's interpreter; that is how the tests check them without a GPU.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._backends import triton_interpreter_enabled

_LOG2_E = math.log2(math.e)


@triton.jit
def _anchor_pool_fwd_kernel(
    q_ptr, k_ptr, v_ptr, gate_ptr, out_ptr, lse_ptr,
    part_acc_ptr, part_max_ptr, part_sum_ptr,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kl, stride_kd,
    stride_vb, stride_vh, stride_vl, stride_vd,
    stride_gb, stride_gn, stride_gl,
    stride_ob, stride_oh, stride_on, stride_od,
    num_heads, seq_n, seq_l, chunk_len, num_splits, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr,
    SPLIT: tl.constexpr, INPUT_PRECISION: tl.constexpr, DOT_DTYPE: tl.constexpr,
):  # fmt: skip
    n_block = tl.program_id(0)
    batch_head = tl.program_id(1)
    split = tl.program_id(2)
    batch = (batch_head // num_heads).to(tl.int64)
    head = (batch_head % num_heads).to(tl.int64)
    in_dtype = q_ptr.dtype.element_ty

    offs_n = n_block * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    n_valid = offs_n < seq_n
    q = tl.load(
        q_ptr + batch * stride_qb + head * stride_qh
        + offs_n[:, None] * stride_qn + offs_d[None, :] * stride_qd,
        mask=n_valid[:, None], other=0.0,
    ).to(DOT_DTYPE)  # fmt: skip
    k_base = k_ptr + batch * stride_kb + head * stride_kh
    v_base = v_ptr + batch * stride_vb + head * stride_vh
    gate_base = gate_ptr + batch * stride_gb + offs_n[:, None] * stride_gn

    row_max = tl.full([BLOCK_N], float("-inf"), tl.float32)  # base-2 logits
    row_sum = tl.zeros([BLOCK_N], tl.float32)
    acc = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    l_start = split * chunk_len
    l_end = tl.minimum(l_start + chunk_len, seq_l)
    for l0 in range(l_start, l_end, BLOCK_L):
        offs_l = l0 + tl.arange(0, BLOCK_L)
        l_valid = offs_l < l_end
        k = tl.load(
            k_base + offs_l[:, None] * stride_kl + offs_d[None, :] * stride_kd,
            mask=l_valid[:, None], other=0.0,
        ).to(DOT_DTYPE)  # fmt: skip
        logits = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION) * qk_scale
        logits = tl.where(l_valid[None, :], logits, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(logits, 1))
        # Every block holds at least one valid key, so new_max is finite and the first
        # rescale is exp2(-inf) = 0.
        rescale = tl.exp2(row_max - new_max)
        probs = tl.exp2(logits - new_max[:, None])
        row_sum = row_sum * rescale + tl.sum(probs, 1)
        gate = tl.load(
            gate_base + offs_l[None, :] * stride_gl,
            mask=n_valid[:, None] & l_valid[None, :], other=0.0,
        ).to(tl.float32)  # fmt: skip
        v = tl.load(
            v_base + offs_l[:, None] * stride_vl + offs_d[None, :] * stride_vd,
            mask=l_valid[:, None], other=0.0,
        ).to(DOT_DTYPE)  # fmt: skip
        # The gate weighs the numerator only: the softmax denominator is ungated.
        acc = acc * rescale[:, None]
        heat = (probs * gate).to(in_dtype).to(DOT_DTYPE)
        acc = tl.dot(heat, v, acc, input_precision=INPUT_PRECISION)
        row_max = new_max

    if SPLIT:
        part_row = (batch_head * num_splits + split).to(tl.int64) * seq_n + offs_n
        tl.store(part_max_ptr + part_row, row_max, mask=n_valid)
        tl.store(part_sum_ptr + part_row, row_sum, mask=n_valid)
        tl.store(
            part_acc_ptr + part_row[:, None] * HEAD_DIM + offs_d[None, :], acc,
            mask=n_valid[:, None],
        )  # fmt: skip
    else:
        out = acc / row_sum[:, None]
        tl.store(
            out_ptr + batch * stride_ob + head * stride_oh
            + offs_n[:, None] * stride_on + offs_d[None, :] * stride_od,
            out.to(out_ptr.dtype.element_ty), mask=n_valid[:, None],
        )  # fmt: skip
        tl.store(
            lse_ptr + batch_head.to(tl.int64) * seq_n + offs_n,
            row_max + tl.log2(row_sum), mask=n_valid,
        )  # fmt: skip


@triton.jit
def _anchor_pool_merge_kernel(
    out_ptr, lse_ptr, part_acc_ptr, part_max_ptr, part_sum_ptr,
    stride_ob, stride_oh, stride_on, stride_od,
    num_heads, seq_n, num_splits,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    n_block = tl.program_id(0)
    batch_head = tl.program_id(1)
    batch = (batch_head // num_heads).to(tl.int64)
    head = (batch_head % num_heads).to(tl.int64)
    offs_n = n_block * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    n_valid = offs_n < seq_n

    row_max = tl.full([BLOCK_N], float("-inf"), tl.float32)
    row_sum = tl.zeros([BLOCK_N], tl.float32)
    acc = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    for split in range(0, num_splits):
        part_row = (batch_head * num_splits + split).to(tl.int64) * seq_n + offs_n
        # Padding rows read max 0 (not -inf) so that no -inf - -inf = nan appears.
        split_max = tl.load(part_max_ptr + part_row, mask=n_valid, other=0.0)
        split_sum = tl.load(part_sum_ptr + part_row, mask=n_valid, other=0.0)
        split_acc = tl.load(
            part_acc_ptr + part_row[:, None] * HEAD_DIM + offs_d[None, :],
            mask=n_valid[:, None], other=0.0,
        )  # fmt: skip
        new_max = tl.maximum(row_max, split_max)
        old_weight = tl.exp2(row_max - new_max)
        split_weight = tl.exp2(split_max - new_max)
        row_sum = row_sum * old_weight + split_sum * split_weight
        acc = acc * old_weight[:, None] + split_acc * split_weight[:, None]
        row_max = new_max

    safe_sum = tl.where(n_valid, row_sum, 1.0)
    out = acc / safe_sum[:, None]
    tl.store(
        out_ptr + batch * stride_ob + head * stride_oh
        + offs_n[:, None] * stride_on + offs_d[None, :] * stride_od,
        out.to(out_ptr.dtype.element_ty), mask=n_valid[:, None],
    )  # fmt: skip
    tl.store(
        lse_ptr + batch_head.to(tl.int64) * seq_n + offs_n,
        row_max + tl.log2(safe_sum), mask=n_valid,
    )  # fmt: skip


@triton.jit
def _anchor_pool_bwd_kv_kernel(
    q_ptr, k_ptr, v_ptr, gate_ptr, out_ptr, grad_out_ptr, lse_ptr,
    grad_k_ptr, grad_v_ptr, grad_gate_ptr,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kl, stride_kd,
    stride_vb, stride_vh, stride_vl, stride_vd,
    stride_gb, stride_gn, stride_gl,
    stride_ob, stride_oh, stride_on, stride_od,
    stride_dob, stride_doh, stride_don, stride_dod,
    stride_dkb, stride_dkh, stride_dkl, stride_dkd,
    stride_dvb, stride_dvh, stride_dvl, stride_dvd,
    stride_dgb, stride_dgn, stride_dgl,
    num_heads, heads_per_program, seq_n, seq_l, qk_scale, scale,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr,
    COMPUTE_GRAD_GATE: tl.constexpr, ACCUMULATE_KV: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, DOT_DTYPE: tl.constexpr,
):  # fmt: skip
    l_block = tl.program_id(0)
    in_dtype = q_ptr.dtype.element_ty
    head_groups = num_heads // heads_per_program
    batch = (tl.program_id(1) // head_groups).to(tl.int64)
    first_head = (tl.program_id(1) % head_groups) * heads_per_program

    offs_l = l_block * BLOCK_L + tl.arange(0, BLOCK_L)
    offs_d = tl.arange(0, HEAD_DIM)
    l_valid = offs_l < seq_l

    # N is usually a single block (N <= 128), then ACCUMULATE_KV is off and the key and
    # value gradients are written once per head. With several query blocks the same
    # program adds into fp32 buffers it alone owns, which keeps the sum deterministic.
    for n0 in range(0, seq_n, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_valid = offs_n < seq_n
        tile_valid = n_valid[:, None] & l_valid[None, :]
        gate = tl.load(
            gate_ptr + batch * stride_gb + offs_n[:, None] * stride_gn
            + offs_l[None, :] * stride_gl,
            mask=tile_valid, other=0.0,
        ).to(tl.float32)  # fmt: skip
        grad_gate = tl.zeros([BLOCK_N, BLOCK_L], tl.float32)
        # The batch offset is int64, which makes every sum of offsets below int64.
        for head in range(first_head, first_head + heads_per_program):
            k = tl.load(
                k_ptr + batch * stride_kb + head * stride_kh
                + offs_l[:, None] * stride_kl + offs_d[None, :] * stride_kd,
                mask=l_valid[:, None], other=0.0,
            ).to(DOT_DTYPE)  # fmt: skip
            v = tl.load(
                v_ptr + batch * stride_vb + head * stride_vh
                + offs_l[:, None] * stride_vl + offs_d[None, :] * stride_vd,
                mask=l_valid[:, None], other=0.0,
            ).to(DOT_DTYPE)  # fmt: skip
            q = tl.load(
                q_ptr + batch * stride_qb + head * stride_qh
                + offs_n[:, None] * stride_qn + offs_d[None, :] * stride_qd,
                mask=n_valid[:, None], other=0.0,
            ).to(DOT_DTYPE)  # fmt: skip
            grad_out = tl.load(
                grad_out_ptr + batch * stride_dob + head * stride_doh
                + offs_n[:, None] * stride_don + offs_d[None, :] * stride_dod,
                mask=n_valid[:, None], other=0.0,
            ).to(DOT_DTYPE)  # fmt: skip
            out = tl.load(
                out_ptr + batch * stride_ob + head * stride_oh
                + offs_n[:, None] * stride_on + offs_d[None, :] * stride_od,
                mask=n_valid[:, None], other=0.0,
            )  # fmt: skip
            lse = tl.load(
                lse_ptr + (batch * num_heads + head) * seq_n + offs_n, mask=n_valid, other=0.0
            )
            # rowsum(P * dP) = sum_d dO * out: recomputed here, cheaper than a launch.
            delta = tl.sum(grad_out.to(tl.float32) * out.to(tl.float32), 1)

            logits = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION) * qk_scale
            probs = tl.where(tile_valid, tl.exp2(logits - lse[:, None]), 0.0)
            grad_heat = tl.dot(grad_out, tl.trans(v), input_precision=INPUT_PRECISION)
            if COMPUTE_GRAD_GATE:
                grad_gate += probs * grad_heat
            heat = (probs * gate).to(in_dtype).to(DOT_DTYPE)
            grad_v = tl.dot(tl.trans(heat), grad_out, input_precision=INPUT_PRECISION)
            grad_logits = probs * (gate * grad_heat - delta[:, None])
            grad_logits_in = grad_logits.to(in_dtype).to(DOT_DTYPE)
            grad_k = tl.dot(tl.trans(grad_logits_in), q, input_precision=INPUT_PRECISION) * scale

            grad_k_ptrs = (
                grad_k_ptr + batch * stride_dkb + head * stride_dkh
                + offs_l[:, None] * stride_dkl + offs_d[None, :] * stride_dkd
            )  # fmt: skip
            grad_v_ptrs = (
                grad_v_ptr + batch * stride_dvb + head * stride_dvh
                + offs_l[:, None] * stride_dvl + offs_d[None, :] * stride_dvd
            )  # fmt: skip
            if ACCUMULATE_KV:
                grad_k += tl.load(grad_k_ptrs, mask=l_valid[:, None], other=0.0)
                grad_v += tl.load(grad_v_ptrs, mask=l_valid[:, None], other=0.0)
            tl.store(grad_k_ptrs, grad_k.to(grad_k_ptr.dtype.element_ty), mask=l_valid[:, None])
            tl.store(grad_v_ptrs, grad_v.to(grad_v_ptr.dtype.element_ty), mask=l_valid[:, None])
        if COMPUTE_GRAD_GATE:
            tl.store(
                grad_gate_ptr + batch * stride_dgb + offs_n[:, None] * stride_dgn
                + offs_l[None, :] * stride_dgl,
                grad_gate.to(grad_gate_ptr.dtype.element_ty), mask=tile_valid,
            )  # fmt: skip


@triton.jit
def _anchor_pool_bwd_q_kernel(
    q_ptr, k_ptr, v_ptr, gate_ptr, out_ptr, grad_out_ptr, lse_ptr, grad_q_ptr,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kl, stride_kd,
    stride_vb, stride_vh, stride_vl, stride_vd,
    stride_gb, stride_gn, stride_gl,
    stride_ob, stride_oh, stride_on, stride_od,
    stride_dob, stride_doh, stride_don, stride_dod,
    stride_dqb, stride_dqh, stride_dqn, stride_dqd,
    num_heads, seq_n, seq_l, chunk_len, num_splits, qk_scale, scale,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr,
    SPLIT: tl.constexpr, INPUT_PRECISION: tl.constexpr, DOT_DTYPE: tl.constexpr,
):  # fmt: skip
    n_block = tl.program_id(0)
    batch_head = tl.program_id(1)
    split = tl.program_id(2)
    batch = (batch_head // num_heads).to(tl.int64)
    head = (batch_head % num_heads).to(tl.int64)
    in_dtype = q_ptr.dtype.element_ty

    offs_n = n_block * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    n_valid = offs_n < seq_n
    row_offsets = offs_n[:, None] * stride_qn + offs_d[None, :] * stride_qd
    q = tl.load(
        q_ptr + batch * stride_qb + head * stride_qh + row_offsets,
        mask=n_valid[:, None], other=0.0,
    ).to(DOT_DTYPE)  # fmt: skip
    grad_out = tl.load(
        grad_out_ptr + batch * stride_dob + head * stride_doh
        + offs_n[:, None] * stride_don + offs_d[None, :] * stride_dod,
        mask=n_valid[:, None], other=0.0,
    ).to(DOT_DTYPE)  # fmt: skip
    out = tl.load(
        out_ptr + batch * stride_ob + head * stride_oh
        + offs_n[:, None] * stride_on + offs_d[None, :] * stride_od,
        mask=n_valid[:, None], other=0.0,
    )  # fmt: skip
    lse = tl.load(lse_ptr + batch_head.to(tl.int64) * seq_n + offs_n, mask=n_valid, other=0.0)
    delta = tl.sum(grad_out.to(tl.float32) * out.to(tl.float32), 1)
    k_base = k_ptr + batch * stride_kb + head * stride_kh
    v_base = v_ptr + batch * stride_vb + head * stride_vh
    gate_base = gate_ptr + batch * stride_gb + offs_n[:, None] * stride_gn

    grad_q = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    l_start = split * chunk_len
    l_end = tl.minimum(l_start + chunk_len, seq_l)
    for l0 in range(l_start, l_end, BLOCK_L):
        offs_l = l0 + tl.arange(0, BLOCK_L)
        l_valid = offs_l < l_end
        tile_valid = n_valid[:, None] & l_valid[None, :]
        k = tl.load(
            k_base + offs_l[:, None] * stride_kl + offs_d[None, :] * stride_kd,
            mask=l_valid[:, None], other=0.0,
        ).to(DOT_DTYPE)  # fmt: skip
        v = tl.load(
            v_base + offs_l[:, None] * stride_vl + offs_d[None, :] * stride_vd,
            mask=l_valid[:, None], other=0.0,
        ).to(DOT_DTYPE)  # fmt: skip
        gate = tl.load(gate_base + offs_l[None, :] * stride_gl, mask=tile_valid, other=0.0).to(
            tl.float32
        )
        logits = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION) * qk_scale
        probs = tl.where(tile_valid, tl.exp2(logits - lse[:, None]), 0.0)
        grad_heat = tl.dot(grad_out, tl.trans(v), input_precision=INPUT_PRECISION)
        grad_logits = probs * (gate * grad_heat - delta[:, None])
        grad_logits_in = grad_logits.to(in_dtype).to(DOT_DTYPE)
        grad_q = tl.dot(grad_logits_in, k, grad_q, input_precision=INPUT_PRECISION)
    grad_q = grad_q * scale

    if SPLIT:
        part_row = (batch_head * num_splits + split).to(tl.int64) * seq_n + offs_n
        tl.store(
            grad_q_ptr + part_row[:, None] * HEAD_DIM + offs_d[None, :], grad_q,
            mask=n_valid[:, None],
        )  # fmt: skip
    else:
        tl.store(
            grad_q_ptr + batch * stride_dqb + head * stride_dqh
            + offs_n[:, None] * stride_dqn + offs_d[None, :] * stride_dqd,
            grad_q.to(grad_q_ptr.dtype.element_ty), mask=n_valid[:, None],
        )  # fmt: skip


def _dot_dtype(dtype: torch.dtype):
    """Operand dtype of ``tl.dot``: the input dtype, except bf16 in the interpreter.

    The interpreter multiplies the raw bit patterns of bf16 operands (triton-lang/triton
    issue 11584, unsupported upstream), so there the operands are rounded to bf16 first
    and multiplied in fp32, which gives the same products as a bf16 tensor-core dot.
    """
    if dtype == torch.bfloat16 and triton_interpreter_enabled():
        return tl.float32
    return {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}[
        dtype
    ]


def _input_precision(dtype: torch.dtype) -> str:
    # fp32 inputs follow torch's own matmul setting, so that switching TF32 on or off
    # affects these kernels exactly as it affects the dense path.
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


class LaunchConfig(NamedTuple):
    block_n: int
    block_l: int
    num_warps: int
    num_stages: int


# (BLOCK_N cap, BLOCK_L, num_warps, num_stages) per kernel, for 16-bit inputs and fp32.
# Not tuned on a GPU (none was available when they were written): chosen by compiling
# every kernel for sm_90 and keeping shared memory well under 227 KiB with no or few
# register spills (`python benchmarks/kernels.py --compile-only` prints both). fp32 dots
# run on FMA units unless TF32 is allowed, which needs far smaller tiles.
_CONFIGS = {
    # kernel: {(is_fp32, head_dim <= 64): config}
    "fwd": {(False, True): (128, 64, 8, 3), (False, False): (128, 32, 8, 2),
            (True, True): (32, 32, 4, 1), (True, False): (32, 32, 8, 1)},
    "bwd_q": {(False, True): (128, 64, 8, 3), (False, False): (128, 32, 8, 2),
              (True, True): (32, 32, 4, 1), (True, False): (32, 32, 8, 1)},
    # The key/value kernel holds the most (BLOCK_N, BLOCK_L) fp32 tiles at once.
    "bwd_kv": {(False, True): (128, 32, 8, 2), (False, False): (128, 16, 8, 2),
               (True, True): (32, 32, 4, 1), (True, False): (32, 16, 4, 1)},
}  # fmt: skip


def launch_config(kernel: str, dtype: torch.dtype, num_queries: int, head_dim: int) -> LaunchConfig:
    """Tile sizes and launch options of ``kernel`` ("fwd", "bwd_q" or "bwd_kv")."""
    block_n_cap, block_l, num_warps, num_stages = _CONFIGS[kernel][
        (dtype == torch.float32, head_dim <= 64)
    ]
    # One query block covers all of N up to the cap (N is ~100 in DeOP), so each key and
    # value tile is read once per head; tl.dot needs at least 16 rows.
    block_n = min(block_n_cap, max(16, triton.next_power_of_2(num_queries)))
    return LaunchConfig(block_n, block_l, num_warps, num_stages)


def _split_plan(
    programs_per_split: int, seq_l: int, block_l: int, device: torch.device,
    num_splits: int | None,
) -> tuple[int, int]:  # fmt: skip
    """(number of splits of L, keys per split, a multiple of ``block_l``)."""
    blocks = triton.cdiv(seq_l, block_l)
    if num_splits is None:
        if device.type == "cuda":
            # Aim for about two programs per multiprocessor, each with at least four
            # key blocks so the merge stays cheap.
            sm_count = torch.cuda.get_device_properties(device).multi_processor_count
            wanted = triton.cdiv(2 * sm_count, programs_per_split)
            num_splits = max(1, min(wanted, blocks // 4))
        else:
            num_splits = 1  # the interpreter runs programs one by one: splitting buys nothing
    num_splits = max(1, min(num_splits, blocks))
    chunk_len = triton.cdiv(blocks, num_splits) * block_l
    # Rounding may leave the last split empty; drop empty splits.
    return triton.cdiv(seq_l, chunk_len), chunk_len


def anchor_pool_forward(q, k, v, gate, scale: float, num_splits: int | None = None):
    """Forward launch. Returns ``out (B, H, N, D)`` and base-2 log-sum-exp ``(B, H, N)``."""
    batch, num_heads, seq_n, head_dim = q.shape
    seq_l = k.shape[2]
    cfg = launch_config("fwd", q.dtype, seq_n, head_dim)
    n_blocks = triton.cdiv(seq_n, cfg.block_n)
    splits, chunk_len = _split_plan(
        batch * num_heads * n_blocks, seq_l, cfg.block_l, q.device, num_splits
    )
    out = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    lse = torch.empty((batch, num_heads, seq_n), device=q.device, dtype=torch.float32)
    if splits > 1:
        part_acc = torch.empty(
            (batch * num_heads, splits, seq_n, head_dim), device=q.device, dtype=torch.float32
        )
        part_max = torch.empty(
            (batch * num_heads, splits, seq_n), device=q.device, dtype=torch.float32
        )
        part_sum = torch.empty_like(part_max)
    else:
        part_acc = part_max = part_sum = lse  # not touched by the kernel when SPLIT is off
    _anchor_pool_fwd_kernel[(n_blocks, batch * num_heads, splits)](
        q, k, v, gate, out, lse, part_acc, part_max, part_sum,
        *q.stride(), *k.stride(), *v.stride(), *gate.stride(), *out.stride(),
        num_heads, seq_n, seq_l, chunk_len, splits, scale * _LOG2_E,
        HEAD_DIM=head_dim, BLOCK_N=cfg.block_n, BLOCK_L=cfg.block_l, SPLIT=splits > 1,
        INPUT_PRECISION=_input_precision(q.dtype), DOT_DTYPE=_dot_dtype(q.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    if splits > 1:
        _anchor_pool_merge_kernel[(n_blocks, batch * num_heads)](
            out, lse, part_acc, part_max, part_sum, *out.stride(),
            num_heads, seq_n, splits, HEAD_DIM=head_dim, BLOCK_N=cfg.block_n,
            num_warps=4,
        )  # fmt: skip
    return out, lse


def anchor_pool_backward(
    q, k, v, gate, out, lse, grad_out, scale: float,
    needs_grad: tuple[bool, bool, bool, bool], num_splits: int | None = None,
):  # fmt: skip
    """Backward launches. Returns ``(grad_q, grad_k, grad_v, grad_gate)``, None where unneeded."""
    need_q, need_k, need_v, need_gate = needs_grad
    batch, num_heads, seq_n, head_dim = q.shape
    seq_l = k.shape[2]
    precision = _input_precision(q.dtype)
    dot_dtype = _dot_dtype(q.dtype)
    grad_q = grad_k = grad_v = grad_gate = None

    if need_k or need_v or need_gate:
        cfg = launch_config("bwd_kv", q.dtype, seq_n, head_dim)
        accumulate_kv = seq_n > cfg.block_n
        kv_dtype = torch.float32 if accumulate_kv else k.dtype
        grad_k = torch.zeros(k.shape, device=k.device, dtype=kv_dtype)
        grad_v = torch.zeros(v.shape, device=v.device, dtype=kv_dtype)
        # Without a gate gradient, each head gets its own program (more parallelism).
        heads_per_program = num_heads if need_gate else 1
        grad_gate = torch.empty(
            gate.shape if need_gate else (1, 1, 1), device=gate.device, dtype=gate.dtype
        )
        grid = (triton.cdiv(seq_l, cfg.block_l), batch * (num_heads // heads_per_program))
        _anchor_pool_bwd_kv_kernel[grid](
            q, k, v, gate, out, grad_out, lse, grad_k, grad_v, grad_gate,
            *q.stride(), *k.stride(), *v.stride(), *gate.stride(), *out.stride(),
            *grad_out.stride(), *grad_k.stride(), *grad_v.stride(), *grad_gate.stride(),
            num_heads, heads_per_program, seq_n, seq_l, scale * _LOG2_E, scale,
            HEAD_DIM=head_dim, BLOCK_N=cfg.block_n, BLOCK_L=cfg.block_l,
            COMPUTE_GRAD_GATE=need_gate, ACCUMULATE_KV=accumulate_kv,
            INPUT_PRECISION=precision, DOT_DTYPE=dot_dtype,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )  # fmt: skip
        grad_k = grad_k.to(k.dtype) if need_k else None
        grad_v = grad_v.to(v.dtype) if need_v else None
        grad_gate = grad_gate if need_gate else None

    if need_q:
        cfg = launch_config("bwd_q", q.dtype, seq_n, head_dim)
        n_blocks = triton.cdiv(seq_n, cfg.block_n)
        splits, chunk_len = _split_plan(
            batch * num_heads * n_blocks, seq_l, cfg.block_l, q.device, num_splits
        )
        if splits > 1:
            target = torch.empty(
                (batch * num_heads, splits, seq_n, head_dim), device=q.device,
                dtype=torch.float32,
            )  # fmt: skip
            target_strides = (0, 0, 0, 0)  # the kernel indexes the partial sums itself
        else:
            target = torch.empty(q.shape, device=q.device, dtype=q.dtype)
            target_strides = target.stride()
        _anchor_pool_bwd_q_kernel[(n_blocks, batch * num_heads, splits)](
            q, k, v, gate, out, grad_out, lse, target,
            *q.stride(), *k.stride(), *v.stride(), *gate.stride(), *out.stride(),
            *grad_out.stride(), *target_strides,
            num_heads, seq_n, seq_l, chunk_len, splits, scale * _LOG2_E, scale,
            HEAD_DIM=head_dim, BLOCK_N=cfg.block_n, BLOCK_L=cfg.block_l, SPLIT=splits > 1,
            INPUT_PRECISION=precision, DOT_DTYPE=dot_dtype,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )  # fmt: skip
        if splits > 1:
            grad_q = target.sum(dim=1).view(batch, num_heads, seq_n, head_dim).to(q.dtype)
        else:
            grad_q = target
    return grad_q, grad_k, grad_v, grad_gate


class TritonAnchorPool(torch.autograd.Function):
    """Autograd function over the Triton launches."""

    @staticmethod
    def forward(ctx, q, k, v, gate, scale: float, num_splits: int | None):
        out, lse = anchor_pool_forward(q, k, v, gate, scale, num_splits)
        ctx.save_for_backward(q, k, v, gate, out, lse)
        ctx.scale = scale
        ctx.num_splits = num_splits
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, gate, out, lse = ctx.saved_tensors
        grads = anchor_pool_backward(
            q,
            k,
            v,
            gate,
            out,
            lse,
            grad_out,
            ctx.scale,
            tuple(ctx.needs_input_grad[:4]),
            ctx.num_splits,
        )
        return (*grads, None, None)


def anchor_pool_triton(q, k, v, gate, scale: float, num_splits: int | None = None):
    """``anchor_pool`` through the Triton kernels; same shapes as ``anchor_pool_dense``."""
    return TritonAnchorPool.apply(q, k, v, gate, scale, num_splits)
