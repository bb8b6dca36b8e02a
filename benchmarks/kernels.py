"""Fused vs unfused attention-mask ops: time and peak memory, side by side.

    python benchmarks/kernels.py                      # defaults below, on CUDA when present
    python benchmarks/kernels.py --L 1024 --repeat 3  # a quick run
    python benchmarks/kernels.py --compile-only       # no GPU needed, see below

anchor_pool (N=100 queries, H=8 heads, D=64, L keys), forward and forward+backward:
  unfused = the dense torch formula (materialises (B, H, N, L));
  fused   = the Triton kernels on CUDA; on CPU the chunked online-softmax torch path
            (the same algorithm in torch ops, what backend="torch" runs for L > 1024).
            Triton's CPU interpreter runs a Python loop per program: it checks the
            kernels, it is not a speed path, so it is never timed here.
mask_guided_attention (N=100 masks, H=12 heads, D=64, T tokens):
  unfused = dense torch (one (B, T, T) matrix shared by the heads);
  fused   = SDPA with q = k = the masks (on CUDA limited to the flash and
            memory-efficient kernels; on CPU SDPA falls back to its math kernel).

Peak memory is the allocator's peak above what was allocated before the call (inputs
excluded): torch.cuda.max_memory_allocated on CUDA, the torch profiler's CPU allocator
record on CPU.

--compile-only compiles every Triton kernel configuration for an sm_90 target without a
GPU and prints shared memory, registers and spills (needs the ptxas bundled with triton).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from onepass_ovs.ops._mask_attention import mask_guided_attention_sdpa
from onepass_ovs.ops._reference import anchor_pool_dense, mask_guided_attention_dense
from onepass_ovs.ops._torch_anchor_pool import DEFAULT_CHUNK, anchor_pool_chunked

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
MIB = 2**20


# ------------------------------------------------------------------ measurement


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn, device: torch.device, warmup: int, repeat: int, stat: str = "median") -> float:
    """Median (or minimum) wall time of ``fn()`` in milliseconds."""
    for _ in range(warmup):
        fn()
    _sync(device)
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        _sync(device)
        samples.append((time.perf_counter() - start) * 1e3)
    # On a shared, loaded machine the minimum estimates the cost without interference.
    return min(samples) if stat == "min" else statistics.median(samples)


@contextlib.contextmanager
def _quiet_stderr():
    """Silences the profiler's C++ log lines, which go straight to file descriptor 2."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def peak_mib(fn, device: torch.device) -> float:
    """Peak allocated memory of ``fn()`` above the memory allocated before it, in MiB."""
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        _sync(device)
        return (torch.cuda.max_memory_allocated(device) - base) / MIB
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as tmp:
        trace = os.path.join(tmp, "trace.json")
        with _quiet_stderr():
            prof.export_chrome_trace(trace)
        with open(trace) as f:
            events = json.load(f)["traceEvents"]
    records = [e["args"] for e in events if e.get("name") == "[memory]"]
    if not records:
        return 0.0
    # "Total Allocated" is the allocator's running total after each event.
    base = records[0]["Total Allocated"] - records[0]["Bytes"]
    return (max(r["Total Allocated"] for r in records) - base) / MIB


# ------------------------------------------------------------------ workloads


def anchor_inputs(batch, heads, queries, keys, head_dim, dtype, device, seed=0):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    q = torch.randn(batch, heads, queries, head_dim, generator=gen)
    k = torch.randn(batch, heads, keys, head_dim, generator=gen)
    v = torch.randn(batch, heads, keys, head_dim, generator=gen)
    gate = torch.rand(batch, queries, keys, generator=gen)
    return [t.to(device=device, dtype=dtype).requires_grad_(True) for t in (q, k, v, gate)]


def fused_anchor_pool(device: torch.device):
    if device.type == "cuda":
        from onepass_ovs.ops._triton_anchor_pool import anchor_pool_triton

        return anchor_pool_triton
    return lambda q, k, v, gate, scale: anchor_pool_chunked(q, k, v, gate, scale, DEFAULT_CHUNK)


def passes(op, inputs):
    """(forward without autograd, forward + backward to every input) closures."""

    def forward():
        with torch.no_grad():
            op(*inputs)

    def forward_backward():
        out = op(*inputs)
        torch.autograd.grad(out, inputs, torch.ones_like(out))

    return {"fwd": forward, "fwd+bwd": forward_backward}


def bench_anchor_pool(args, device, dtype):
    scale = args.head_dim**-0.5
    fused = fused_anchor_pool(device)
    rows = []
    for keys in args.L:
        inputs = anchor_inputs(args.batch, args.heads, args.queries, keys, args.head_dim,
                               dtype, device)  # fmt: skip
        unfused_passes = passes(lambda *t: anchor_pool_dense(*t, scale), inputs)
        fused_passes = passes(lambda *t: fused(*t, scale), inputs)
        for name in ("fwd", "fwd+bwd"):
            rows.append(_row(keys, name, unfused_passes[name], fused_passes[name], device, args))
        del inputs
    return rows


def bench_mask_attention(args, device, dtype):
    rows = []
    for tokens in args.T:
        gen = torch.Generator(device="cpu").manual_seed(0)
        masks = torch.rand(args.batch, tokens, args.queries, generator=gen)
        values = torch.randn(args.batch, args.mask_heads, tokens, args.head_dim, generator=gen)
        inputs = [t.to(device=device, dtype=dtype).requires_grad_(True) for t in (masks, values)]
        unfused_passes = passes(lambda m, v: mask_guided_attention_dense(m, v, 1.0), inputs)
        fused_passes = passes(lambda m, v: mask_guided_attention_sdpa(m, v, 1.0), inputs)
        for name in ("fwd", "fwd+bwd"):
            rows.append(_row(tokens, name, unfused_passes[name], fused_passes[name], device, args))
        del inputs
    return rows


def _row(size, name, unfused, fused, device, args):
    t_unfused = time_ms(unfused, device, args.warmup, args.repeat, args.stat)
    t_fused = time_ms(fused, device, args.warmup, args.repeat, args.stat)
    m_unfused = peak_mib(unfused, device)
    m_fused = peak_mib(fused, device)
    return (size, name, t_unfused, t_fused, m_unfused, m_fused)


def print_table(title, size_name, fused_name, rows):
    print(f"\n{title}")
    header = (f"| {size_name:>6} | pass    | unfused ms | {fused_name + ' ms':>10} | speedup "
              f"| unfused MiB | {fused_name + ' MiB':>11} | memory ratio |")  # fmt: skip
    print(header)
    print("|" + "|".join("-" * (len(cell)) for cell in header.split("|")[1:-1]) + "|")
    for size, name, t_unfused, t_fused, m_unfused, m_fused in rows:
        speedup = t_unfused / t_fused if t_fused > 0 else float("nan")
        memory_ratio = m_unfused / m_fused if m_fused > 0 else float("nan")
        print(f"| {size:>6} | {name:<7} | {t_unfused:>10.2f} | {t_fused:>10.2f} | {speedup:>6.2f}x "
              f"| {m_unfused:>11.1f} | {m_fused:>11.1f} | {memory_ratio:>11.2f}x |")  # fmt: skip


# ------------------------------------------------------------- compile-only check

# Strides that are 1 for contiguous inputs; Triton specialises those to constants.
_UNIT_STRIDES = {"stride_qd", "stride_kd", "stride_vd", "stride_gl", "stride_od", "stride_dod",
                 "stride_dkd", "stride_dvd", "stride_dgl", "stride_dqd"}  # fmt: skip


def compile_only(arch: int, dtype_names: list[str]) -> None:
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from onepass_ovs.ops import _triton_anchor_pool as kernels

    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                             "cuobjdump")  # fmt: skip
    target = GPUTarget("cuda", arch, 32)

    def resources(compiled) -> str:
        with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
            cubin.write(compiled.asm["cubin"])
            cubin.flush()
            dump = subprocess.run([cuobjdump, "--dump-resource-usage", cubin.name],
                                  capture_output=True, text=True).stdout  # fmt: skip
        fields = next(line for line in dump.splitlines() if "REG:" in line).split()
        return " ".join(f for f in fields if f.startswith(("REG:", "STACK:")))

    def build(kernel, constexprs, pointer_types, num_warps, num_stages):
        names = kernel.arg_names
        constexprs = {**constexprs, **{n: 1 for n in names if n in _UNIT_STRIDES}}
        signature, attrs = {}, {}
        for index, name in enumerate(names):
            if name in constexprs:
                signature[name] = "constexpr"
                continue
            if name.endswith("_ptr"):
                signature[name] = pointer_types.get(name, pointer_types["*"])
            else:
                signature[name] = "fp32" if name in ("qk_scale", "scale") else "i32"
            if name.endswith("_ptr") or name.startswith("stride"):
                attrs[(index,)] = [["tt.divisibility", 16]]
        source = ASTSource(kernel, signature, constexprs, attrs)
        return triton.compile(
            source, target=target, options={"num_warps": num_warps, "num_stages": num_stages}
        )

    print("| kernel | dtype | D | BLOCK_N | BLOCK_L | warps | stages | shared KiB | registers |")
    print("|---|---|---|---|---|---|---|---|---|")
    tl_dtypes = {"fp16": tl.float16, "bf16": tl.bfloat16, "fp32": tl.float32}
    for dtype_name in dtype_names:
        torch_dtype = DTYPES[dtype_name]
        precision = "ieee" if dtype_name == "fp32" else "tf32"
        for head_dim in (32, 64, 128):
            for name, kernel in (("fwd", kernels._anchor_pool_fwd_kernel),
                                 ("bwd_kv", kernels._anchor_pool_bwd_kv_kernel),
                                 ("bwd_q", kernels._anchor_pool_bwd_q_kernel)):  # fmt: skip
                cfg = kernels.launch_config(name, torch_dtype, 100, head_dim)
                constexprs = {"HEAD_DIM": head_dim, "BLOCK_N": cfg.block_n,
                              "BLOCK_L": cfg.block_l, "INPUT_PRECISION": precision,
                              "DOT_DTYPE": tl_dtypes[dtype_name]}  # fmt: skip
                pointers = {"*": f"*{dtype_name}", "lse_ptr": "*fp32"}
                if name == "bwd_kv":
                    constexprs.update(COMPUTE_GRAD_GATE=True, ACCUMULATE_KV=False)
                else:
                    constexprs["SPLIT"] = True
                    pointers.update(part_acc_ptr="*fp32", part_max_ptr="*fp32",
                                    part_sum_ptr="*fp32", grad_q_ptr="*fp32")  # fmt: skip
                compiled = build(kernel, constexprs, pointers, cfg.num_warps, cfg.num_stages)
                shared_kib = compiled.metadata.shared / 1024
                print(f"| {name} | {dtype_name} | {head_dim} | {cfg.block_n} | {cfg.block_l} "
                      f"| {cfg.num_warps} | {cfg.num_stages} | {shared_kib:.0f} "
                      f"| {resources(compiled)} |", flush=True)  # fmt: skip


# ------------------------------------------------------------------ main


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--L", type=int, nargs="+", default=[1024, 4096, 16384], help="anchor_pool key counts"
    )
    parser.add_argument(
        "--T", type=int, nargs="+", default=[1025, 4097], help="mask_guided_attention token counts"
    )
    parser.add_argument("--ops", nargs="+", choices=["anchor", "mask"], default=["anchor", "mask"])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=8, help="anchor_pool heads")
    parser.add_argument("--mask-heads", type=int, default=12, help="mask_guided_attention heads")
    parser.add_argument("--queries", type=int, default=100, help="N: queries / masks")
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), default=None, help="default: fp16 on CUDA, fp32 on CPU"
    )
    parser.add_argument("--device", default=None, help="default: cuda when available")
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument(
        "--stat", choices=["median", "min"], default="median", help="statistic over the timed runs"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument(
        "--compile-only",
        action="store_true",
        help="compile the Triton kernels for --arch and print resource usage",
    )
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability, e.g. 90")
    args = parser.parse_args(argv)  # fmt: skip

    if args.compile_only:
        compile_only(args.arch, [args.dtype] if args.dtype else ["fp16", "bf16", "fp32"])
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = DTYPES[args.dtype or ("fp16" if device.type == "cuda" else "fp32")]
    where = (torch.cuda.get_device_name(device) if device.type == "cuda"
             else f"CPU, {torch.get_num_threads()} threads")  # fmt: skip
    print(f"device: {where}; dtype {dtype}; torch {torch.__version__}; "
          f"{args.stat} of {args.repeat} runs after {args.warmup} warm-up runs")  # fmt: skip
    fused_name = "triton" if device.type == "cuda" else "chunked"
    if "anchor" in args.ops:
        rows = bench_anchor_pool(args, device, dtype)
        print_table(
            f"anchor_pool: B={args.batch} H={args.heads} N={args.queries} D={args.head_dim}"
            f" (fused = {fused_name})", "L", fused_name, rows,
        )  # fmt: skip
    if "mask" in args.ops:
        rows = bench_mask_attention(args, device, dtype)
        print_table(
            f"mask_guided_attention: B={args.batch} H={args.mask_heads} N={args.queries}"
            f" D={args.head_dim} (fused = sdpa)", "T", "sdpa", rows,
        )  # fmt: skip


if __name__ == "__main__":
    main()
