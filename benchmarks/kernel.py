"""Dequantize-matmul kernel speed on Llama-3-8B layer shapes (needs a CUDA GPU).

For each (K, N) of Llama-3-8B's projections and M ∈ {1, 4, 16, 64}: our op's time
(`compress::dequant_matmul`, which picks a cuda_ext kernel by M), cuBLAS on the dense FP16
(or BF16) weight (`torch.matmul`), dequantize + cuBLAS, the speedup over the dense product, the
achieved bandwidth (packed weight + scales + activations + output bytes over time) and its
share of the device's copy bandwidth, measured in the same run with a large device-to-device
copy. The GEMV (M ≤ 16) and tensor-core (M ≤ 64) kernels are also timed on their own, so that
the row limits in compress/kernels.py can be set from one run, and the tensor-core kernel's
grid is shown (blocks of 128 rows × splits of K, and how much of one wave of the SMs they
fill).

`--sweep-splits` times the tensor-core kernel instead at every split of K in 1, 2, 4, … 64
(as many as K has chunks for) beside the plan's own choice, each split with its partial sums
added by the last block and by a second kernel (the op's `splits` and `sum_in_kernel`
arguments override the launch plan), and prints which was fastest per shape and M: one GPU
run shows where compress_kernels::plan_mma's heuristics (models: two blocks per SM, at most
one wave, partial sums under the weight's bytes; the last block adds at most 64 sums per
thread) leave time behind.

Timing: the `--iters` calls of a round are captured in one CUDA graph and replayed between
CUDA events (eager calls where capture fails; the table says which), after `--warmup` calls;
median of `--repeats` rounds. A graph keeps the host's per-call dispatch (microseconds of
Python, as long as a decode-shape kernel) out of the device time. The calls rotate through
enough copies of the weights to fill three times the L2 cache, so that each call reads its
weights from device memory as a decoding model does, not from L2 (Llama-3-8B's 4096×14336
INT4 weight is 29 MB; an H100's L2 is 50 MB); the L2 is also flushed between rounds.

    python benchmarks/kernel.py [--bits 4 --group-size 128] [--dtype float16] [--sweep-splits]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable

import torch

from compress import cuda_ops
from compress.kernels import CUDA_GEMV_MAX_ROWS, CUDA_MMA_MAX_ROWS, cuda_path, dequantize_packed
from compress.quant.packing import PackedWeight
from compress.quant.primitives import QuantSpec, choose_qparams, quantize

OP = torch.ops.compress.dequant_matmul
# (K, N) of Llama-3-8B: q/o_proj, gate/up_proj, down_proj, k/v_proj.
SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096), (4096, 1024)]
ROWS = (1, 4, 16, 64)
# The splits of K --sweep-splits tries (besides the plan's), where K has that many chunks.
SWEEP_SPLITS = (1, 2, 4, 8, 16, 32, 64)
# The weights timed here are fresh allocations (16-byte aligned rows) on a GPU the kernels run
# on (main checks cuda_ops.runs_on; every such GPU is sm_80+): the tensor cores can read them.
MMA_CAPABLE = True


# How each measurement ran: "graph" while every capture succeeded, else "eager".
TIMING_MODES: set[str] = set()


def _captured(calls: list[Callable[[], object]]) -> Callable[[], object]:
    """The calls as one CUDA graph's replay, or as eager calls where capture fails."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # handles and workspaces are made outside the capture
        for fn in calls[:2]:
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            for fn in calls:
                fn()
    except RuntimeError:
        TIMING_MODES.add("eager")
        return lambda: [fn() for fn in calls]
    TIMING_MODES.add("graph")
    return graph.replay


def time_ms(fns: list[Callable[[], object]], warmup: int, iters: int, repeats: int) -> float:
    """Milliseconds per call: `iters` calls per round, rotating through `fns` (one per copy
    of the operands), median of `repeats` rounds."""
    flush = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")
    calls = [fns[i % len(fns)] for i in range(iters)]
    for i in range(warmup):
        fns[i % len(fns)]()
    run = _captured(calls)
    rounds = []
    for _ in range(repeats):
        flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        torch.cuda.synchronize()
        rounds.append(start.elapsed_time(end) / iters)
    return statistics.median(rounds)


def copies_for(tensor_bytes: int) -> int:
    """Copies of an operand that together fill three times the device's L2 cache."""
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    return max(1, -(-3 * l2 // max(tensor_bytes, 1)))


def measure(
    x: torch.Tensor,
    op_args: list[tuple],
    dense: list[torch.Tensor],
    args: argparse.Namespace,
) -> dict[str, float | None]:
    """Milliseconds per call: our op, cuBLAS on the dense weight, dequantize + cuBLAS,
    and each of our kernels where it takes this many rows (None where not). `op_args` and
    `dense` are copies of one weight, rotated through."""
    timing = (args.warmup, args.iters, args.repeats)
    ops = torch.ops.compress_cuda
    rows = x.shape[0]
    # The tensor-core kernel takes these shapes if the op would send it its largest M.
    mma_shapes = cuda_path(CUDA_MMA_MAX_ROWS, *op_args[0][3:], mma_capable=MMA_CAPABLE) == "mma"
    mma_ok = mma_shapes and rows <= CUDA_MMA_MAX_ROWS

    def each(call: Callable[..., object]) -> list[Callable[[], object]]:
        return [lambda a=a: call(*a) for a in op_args]

    return {
        "ours": time_ms(each(lambda *a: OP(x, *a)), *timing),
        "cublas": time_ms([lambda w=w: torch.matmul(x, w.t()) for w in dense], *timing),
        "two_step": time_ms(each(lambda *a: torch.matmul(x, ops.dequantize(*a).t())), *timing),
        "gemv": time_ms(each(lambda *a: ops.gemv(x, *a)), *timing)
        if rows <= CUDA_GEMV_MAX_ROWS
        else None,
        "mma": time_mma(x, op_args, 0, None, args) if mma_ok else None,
    }


def _us(ms: float | None) -> str:
    return "–" if ms is None else f"{ms * 1e3:.1f}"


def mma_plan(
    m: int, n: int, k: int, args: argparse.Namespace, splits: int = 0, in_kernel: bool | None = None
) -> list[int]:
    """compress_cuda::mma_plan for these shapes, with the op's overrides (the defaults: the
    plan's own choices): [m_rows, ScaleMode, blocks_n, splits, blocks_per_sm, sum_in_kernel]."""
    return torch.ops.compress_cuda.mma_plan(
        m, n, k, args.group_size, args.bits, args.dtype == "bfloat16", splits, in_kernel
    )


def mma_grid(
    m: int, n: int, k: int, args: argparse.Namespace, splits: int = 0, in_kernel: bool | None = None
) -> str:
    """The tensor-core kernel's grid for these shapes on this device (compress_cuda::mma_plan):
    blocks of 128 rows n × splits of K, their share of one wave (the blocks an SM holds at
    once: the plan caps its grid there) and who adds the splits: the last block, or a second
    kernel. `splits` and `in_kernel` as the op's overrides (the defaults: the plan's)."""
    _, _, blocks_n, splits, per_sm, in_kernel = mma_plan(m, n, k, args, splits, in_kernel)
    sm_count = torch.cuda.get_device_properties(0).multi_processor_count
    wave = blocks_n * splits / (per_sm * sm_count)
    summed = "" if splits == 1 else ", sums in kernel" if in_kernel else ", sums: 2nd kernel"
    return f"{blocks_n} × {splits} ({wave:.2f} of a wave{summed})"


def copy_bandwidth_gbs(args: argparse.Namespace) -> float:
    """Device-to-device copy of 1 GiB: bytes read + written per second."""
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = time_ms([lambda: dst.copy_(src)], args.warmup, args.iters, args.repeats)
    return 2 * src.numel() / (ms * 1e-3) / 1e9


def make_weight(k: int, n: int, spec: QuantSpec, dtype: torch.dtype):
    weight = torch.randn(n, k, device="cuda") * 0.02
    qparams = choose_qparams(weight, spec, dtype)
    q = quantize(weight, qparams, spec)
    return PackedWeight.from_quantized(q, qparams.scale, qparams.zero, spec.bits, spec.symmetric)


def operand_copies(packed: PackedWeight, args: argparse.Namespace, k: int) -> tuple[list, int]:
    """The op's weight arguments, copied to fill three times the L2 cache, and the bytes of
    one copy."""
    zero = packed.weight_zero_point
    tensors = [t for t in (packed.weight_packed, packed.weight_scale, zero) if t is not None]
    weight_bytes = sum(t.numel() * t.element_size() for t in tensors)
    op_args = [
        (packed.weight_packed.clone(), packed.weight_scale.clone(),
         None if zero is None else zero.clone(), args.bits, args.group_size, k)
        for _ in range(copies_for(weight_bytes))
    ]  # fmt: skip
    return op_args, weight_bytes


def kernel_table(spec: QuantSpec, dtype: torch.dtype, args: argparse.Namespace) -> list[str]:
    """The measured copy bandwidth and the table: each path's µs per shape and M."""
    peak = copy_bandwidth_gbs(args)
    dense_name = "FP16" if dtype == torch.float16 else "BF16"
    lines = [
        f"Measured copy bandwidth: {peak:.0f} GB/s.",
        "",
        f"| K×N | M | path | ours (µs) | {dense_name} cuBLAS (µs) | dequant + cuBLAS (µs) "
        f"| speedup vs {dense_name} | GB/s | % of copy bw | GEMV (µs) | tensor cores (µs) "
        "| tensor-core grid |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for k, n in SHAPES:
        packed = make_weight(k, n, spec, dtype)
        dense = dequantize_packed(
            packed.weight_packed, packed.weight_scale, packed.weight_zero_point, args.bits,
            args.group_size, k, dtype,
        )  # fmt: skip
        op_args, weight_bytes = operand_copies(packed, args, k)
        denses = [dense.clone() for _ in range(copies_for(dense.numel() * dense.element_size()))]
        for m in ROWS:
            x = torch.randn(m, k, device="cuda", dtype=dtype)
            t = measure(x, op_args, denses, args)
            path = cuda_path(m, *op_args[0][3:], mma_capable=MMA_CAPABLE)
            moved = weight_bytes + (m * k + m * n) * x.element_size()
            gbs = moved / (t["ours"] * 1e-3) / 1e9
            lines.append(
                f"| {k}×{n} | {m} | {path} | {t['ours'] * 1e3:.1f} | {t['cublas'] * 1e3:.1f} "
                f"| {t['two_step'] * 1e3:.1f} | {t['cublas'] / t['ours']:.2f}× | {gbs:.0f} "
                f"| {100 * gbs / peak:.0f}% | {_us(t['gemv'])} | {_us(t['mma'])} "
                f"| {mma_grid(m, n, k, args) if t['mma'] is not None else '–'} |"
            )
        del op_args, denses
    return lines


def time_mma(
    x: torch.Tensor,
    op_args: list[tuple],
    splits: int,
    in_kernel: bool | None,
    args: argparse.Namespace,
) -> float:
    """Milliseconds per tensor-core kernel call at this split of K, the splits added by the
    last block (in_kernel True) or by a second kernel (False)."""
    mma_gemm = torch.ops.compress_cuda.mma_gemm
    calls = [lambda a=a: mma_gemm(x, *a, splits, in_kernel) for a in op_args]
    return time_ms(calls, args.warmup, args.iters, args.repeats)


def sweep_splits(spec: QuantSpec, dtype: torch.dtype, args: argparse.Namespace) -> list[str]:
    """Table rows: the tensor-core kernel's µs at each split of K (summed by the last block
    and by a second kernel) against the plan's choice."""
    lines = [
        "| K×N | M | plan's grid | plan (µs) | fastest grid | fastest (µs) | plan ÷ fastest "
        "| µs by splits of K (last block / 2nd kernel) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for k, n in SHAPES:
        op_args, _ = operand_copies(make_weight(k, n, spec, dtype), args, k)
        if cuda_path(CUDA_MMA_MAX_ROWS, *op_args[0][3:], mma_capable=MMA_CAPABLE) != "mma":
            lines.append(f"| {k}×{n} | – | the tensor-core kernel does not take this shape |")
            continue
        for m in ROWS:
            x = torch.randn(m, k, device="cuda", dtype=dtype)
            plan = mma_plan(m, n, k, args)
            # What the kernel makes of each count asked for: equal counts run once.
            tried = {mma_plan(m, n, k, args, asked)[3] for asked in SWEEP_SPLITS} | {plan[3]}
            us = {
                (splits, in_kernel): 1e3 * time_mma(x, op_args, splits, in_kernel, args)
                for splits in sorted(tried)
                for in_kernel in ((None,) if splits == 1 else (True, False))
            }
            planned = (plan[3], None if plan[3] == 1 else bool(plan[5]))
            fastest = min(us, key=us.get)
            by_splits = " · ".join(
                f"{s}: {t:.1f}" if s == 1 else f"{s}: {t:.1f} / {us[s, False]:.1f}"
                for (s, in_kernel), t in us.items()
                if in_kernel is not False
            )
            lines.append(
                f"| {k}×{n} | {m} | {mma_grid(m, n, k, args)} | {us[planned]:.1f} "
                f"| {mma_grid(m, n, k, args, *fastest)} | {us[fastest]:.1f} "
                f"| {us[planned] / us[fastest]:.2f} | {by_splits} |"
            )
        del op_args
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=int, default=4, choices=[4, 8])
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--asymmetric", action="store_true")
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--sweep-splits", action="store_true",
        help="time the tensor-core kernel at each split of K against its launch plan's",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.stderr.write("benchmarks/kernel.py needs a CUDA GPU; none is visible\n")
        return 2
    if not cuda_ops.load():
        sys.stderr.write("the cuda_ext kernels could not be built or loaded (see the log)\n")
        return 1
    dtype = getattr(torch, args.dtype)
    spec = QuantSpec(args.bits, args.group_size, not args.asymmetric)
    if not cuda_ops.runs_on(torch.device("cuda", torch.cuda.current_device())):
        sys.stderr.write("the cuda_ext kernels hold no code this GPU runs (see the log)\n")
        return 1
    title = (
        f"## {'mma_gemm splits of K' if args.sweep_splits else 'dequant_matmul'}: "
        f"INT{args.bits} g{args.group_size} {'asym' if args.asymmetric else 'sym'}, "
        f"{args.dtype}, {torch.cuda.get_device_name()}, torch {torch.__version__}"
    )
    if args.sweep_splits:
        lines = sweep_splits(spec, dtype, args)
    else:
        lines = kernel_table(spec, dtype, args)
    timing = " and ".join(sorted(TIMING_MODES))
    lines[:0] = [
        title,
        "",
        f"Timing: {timing} ({args.iters} calls per round, median of {args.repeats}).",
        "",
    ]
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
