"""Machine-code cost of the cuda_ext kernels, without a GPU: what each main loop issues per weight.

Compiles `cuda_ext/dequant_matmul_kernels.cuh` for one architecture (sm_90 by default) with the
build's nvcc flags, in one instantiation unit without ATen, disassembles it with cuobjdump,
finds each kernel's main loop (the longest backward branch) and counts its instructions per
weight it consumes. The weights a loop consumes follow from the kernel's structure; the script
checks that against the loop's own FFMA (GEMV) or HMMA (tensor-core) count and stops if they
disagree, so a changed kernel cannot leave it counting the wrong thing.

This is a static count, not a timing. It answers one question a GPU run would otherwise have
to: can the loop issue fast enough to keep up with the weight stream? The last column models
that for the 4096×14336 projection: the loop's warp instructions over 132 SMs × 4 schedulers
× 1.98 GHz (an H100 SXM issuing one instruction per scheduler per cycle), against 8.8 µs to
read its INT4 g128 weights at 3.35 TB/s (INT8: 17.5 µs). Loads, latency and the tensor cores'
own rate are not in it: benchmarks/kernel.py measures those.

Needs nvcc, cuobjdump and the nvdisasm it runs: on PATH, under $CUDA_HOME/bin, or from the
PyPI packages `nvidia-cuda-cuobjdump` and `nvidia-cuda-nvdisasm` in this Python's environment.

    python benchmarks/kernel_sass.py [--arch sm_90] [--check]

`--check` (run by scripts/check_cuda_build.sh in CI) also fails when a kernel spills registers
or when the tensor-core kernel at M ≤ 8 issues more per weight than the GEMV at M = 1: the
dispatch sends decode steps to the tensor cores on that ground (compress/kernels.py).
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
KERNELS_DIR = REPO / "cuda_ext"
# The build's flags come from compress/cuda_build.py, which imports only the standard library,
# so this script loads it alone: it runs in CI's CUDA build venv, where compress is not installed.
sys.path.insert(0, str(REPO / "compress"))
import cuda_build  # noqa: E402

# The flags of setup.py and compress/cuda_ops.py (torch's extension build adds the first and last).
NVCC_FLAGS = ["-std=c++17", *cuda_build.BASE_NVCC_FLAGS, "--expt-relaxed-constexpr"]
# What the H100 SXM model of the last column assumes (see the docstring).
ISSUE_RATE = 132 * 4 * 1.98e9  # warp instructions per second
MODEL_K, MODEL_N = 4096, 14336
SM_COUNT = 132
# What decides how many blocks of a kernel an SM holds at once on sm_80 and sm_90 (the CUDA
# occupancy calculator's rules): registers are allocated per warp in units of 256, from 65536
# per SM; at most 2048 threads and 32 blocks per SM. Both kernels run 128 threads (4 warps)
# per block and no shared memory to speak of, so registers decide.
REGISTERS_PER_SM, REGISTER_UNIT, THREADS_PER_SM, BLOCKS_PER_SM = 65536, 256, 2048, 32
THREADS_PER_BLOCK = 128
# (K, N) of benchmarks/kernel.py's Llama-3-8B shapes, and the rows M its table reports (and 32).
PLAN_SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096), (4096, 1024)]
PLAN_ROWS = (1, 4, 16, 32, 64)
WEIGHT_READ_US = {4: 8.8, 8: 17.5}
DEQUANTIZE_OPS = ("PRMT", "LOP3", "HADD2", "HMUL2", "SHF", "FADD", "FMUL", "F2FP")
DTYPES = {"float16": "__half", "bfloat16": "__nv_bfloat16"}
# compress_kernels::ScaleMode: where the tensor-core kernel applies the scales, and its value.
SCALE_MODES = {"weights": 0, "chunk": 1, "end": 2}
SCALE_MODE_NAMES = {"weights": "kWeights", "chunk": "kChunk", "end": "kEnd"}


@dataclass(frozen=True)
class Variant:
    """One kernel instantiation and the weights one trip through its main loop consumes."""

    kernel: str  # "gemv" or "mma"
    dtype: str
    bits: int
    rows: int  # M the instantiation serves (its accumulator rows)
    scales: str = "weights"  # tensor cores: the ScaleMode (SCALE_MODES)

    @property
    def per_word(self) -> int:
        return 32 // self.bits

    @property
    def block_rows(self) -> int:
        """GEMV output rows per block (gemv_rows_per_block in the header)."""
        return 4 if self.rows <= 4 else 2

    @property
    def chunks(self) -> int:
        """Tensor-core chunks per trip: two where the kernel prefetches (kPrefetch)."""
        return 2 if self.rows <= 32 else 1

    def template(self) -> str:
        t = DTYPES[self.dtype]
        if self.kernel == "gemv":
            return f"gemv_kernel<{t}, {self.bits}, {self.rows}, {self.block_rows}>"
        mode = f"compress_kernels::ScaleMode::{SCALE_MODE_NAMES[self.scales]}"
        return f"mma_kernel<{t}, {self.bits}, {self.rows}, {mode}>"

    def mangled_stem(self) -> str:
        """The part of the mangled name that tells the instantiations apart."""
        t = {"float16": "6__half", "bfloat16": "13__nv_bfloat16"}[self.dtype]
        if self.kernel == "gemv":
            return f"gemv_kernelI{t}Li{self.bits}ELi{self.rows}ELi{self.block_rows}EE"
        mode = f"LNS_9ScaleModeE{SCALE_MODES[self.scales]}E"
        return f"mma_kernelI{t}Li{self.bits}ELi{self.rows}E{mode}E"

    def signature(self) -> str:
        t = DTYPES[self.dtype]
        common = f"const {t}*, const int32_t*, const {t}*, const int32_t*, {t}*"
        if self.kernel == "gemv":
            return f"({common}, int, int, int, int, int)"
        return f"({common}, float*, int*, int, int, int, int, int, int)"

    def weights_per_trip(self) -> int:
        """Per thread: GEMV, two words (unroll 2) of each of its block rows; tensor cores,
        one slice (four words) of each of its four rows per chunk."""
        if self.kernel == "gemv":
            return 2 * self.block_rows * self.per_word
        return self.chunks * 4 * 4 * self.per_word

    def expected_math(self) -> tuple[str, int]:
        """The loop's multiply-adds per trip, as the kernel's structure implies them."""
        if self.kernel == "gemv":
            return "FFMA", 2 * self.block_rows * self.rows * (self.per_word + 1)
        steps = self.per_word  # slice_k / 4
        return "HMMA", self.chunks * steps * 2 * (self.rows // 8)


# Chunk scales run up to 32 rows for INT4 and 16 for INT8 (chunk_scale_max_rows in the header).
CHUNK_SCALE_MAX_ROWS = {4: 32, 8: 16}


def mma_variants(dtype: str, bits: int, rows: tuple[int, ...]) -> list[Variant]:
    """The tensor-core instantiations the plan launches, each ScaleMode where it applies."""
    return [
        Variant("mma", dtype, bits, m, scales)
        for scales in SCALE_MODES
        for m in rows
        if scales != "chunk" or m <= CHUNK_SCALE_MAX_ROWS[bits]
    ]


VARIANTS = [
    *(Variant("gemv", d, 4, m) for d in DTYPES for m in (1, 4)),
    *(v for d in DTYPES for v in mma_variants(d, 4, (8, 16, 32, 64))),
    *(Variant("gemv", d, 8, 1) for d in DTYPES),
    *(v for d in DTYPES for v in mma_variants(d, 8, (8, 16, 64))),
]


def blocks_per_sm(registers: int) -> int:
    """Blocks of a 128-thread kernel using `registers` per thread that one SM holds at once."""
    warp_registers = -(-registers * 32 // REGISTER_UNIT) * REGISTER_UNIT
    by_registers = REGISTERS_PER_SM // (warp_registers * THREADS_PER_BLOCK // 32)
    return min(by_registers, THREADS_PER_SM // THREADS_PER_BLOCK, BLOCKS_PER_SM)


def find_tool(name: str) -> str:
    """A CUDA tool on PATH, under $CUDA_HOME/bin, or in a pip-installed nvidia package."""
    found = shutil.which(name)
    if found:
        return found
    cuda_home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    candidates = [Path(cuda_home) / "bin" / name]
    candidates += sorted(Path(sysconfig.get_paths()["purelib"]).glob(f"nvidia/*/bin/{name}"))
    for candidate in candidates:
        if candidate.is_file():
            return str(candidate)
    package = {"cuobjdump": "nvidia-cuda-cuobjdump", "nvdisasm": "nvidia-cuda-nvdisasm"}
    hint = f" (pip install {package[name]})" if name in package else ""
    raise SystemExit(f"benchmarks/kernel_sass.py: {name} not found{hint}")


def instantiation_unit(variants: list[Variant]) -> str:
    lines = ['#include "device_environment.cuh"', '#include "dequant_matmul_kernels.cuh"']
    for v in variants:
        lines.append(f"template __global__ void compress_kernels::{v.template()}{v.signature()};")
    return "\n".join(lines) + "\n"


def compile_and_disassemble(variants: list[Variant], arch: str) -> tuple[str, str]:
    """(ptxas resource report, SASS listing)."""
    nvcc, cuobjdump = find_tool("nvcc"), find_tool("cuobjdump")
    # cuobjdump runs nvdisasm for SASS and looks for it on PATH.
    path = os.pathsep.join([str(Path(find_tool("nvdisasm")).parent), os.environ.get("PATH", "")])
    with tempfile.TemporaryDirectory() as tmp:
        source, cubin = Path(tmp) / "kernels.cu", Path(tmp) / "kernels.cubin"
        source.write_text(instantiation_unit(variants))
        command = [
            nvcc, *NVCC_FLAGS, f"-arch={arch}", "-cubin", "-Xptxas", "-v",
            f"-I{KERNELS_DIR}", str(source), "-o", str(cubin),
        ]  # fmt: skip
        built = subprocess.run(command, capture_output=True, text=True, check=False)
        if built.returncode != 0:
            raise SystemExit(f"nvcc failed:\n{built.stderr[-4000:]}")
        sass = subprocess.run(
            [cuobjdump, "-sass", str(cubin)],
            capture_output=True,
            text=True,
            check=False,
            env={**os.environ, "PATH": path},
        )
        if sass.returncode != 0 or "Function :" not in sass.stdout:
            raise SystemExit(f"cuobjdump -sass failed:\n{sass.stderr[-4000:]}")
        return built.stderr + built.stdout, sass.stdout


def resources(report: str) -> dict[str, tuple[int, int]]:
    """Mangled kernel name → (registers, spill bytes stored + loaded)."""
    found: dict[str, tuple[int, int]] = {}
    name = None
    spills = 0
    for line in report.splitlines():
        if m := re.search(r"Compiling entry function '(\w+)'", line):
            name = m.group(1)
        elif m := re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line):
            spills = int(m.group(1)) + int(m.group(2))
        elif (m := re.search(r"Used (\d+) registers", line)) and name:
            found[name] = (int(m.group(1)), spills)
    return found


# "  /*0af0*/   @!P2 LDG.E.128.CONSTANT R20, ..." → address, opcode (after any predicate).
INSTRUCTION = re.compile(r"\s+/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][\w.]*)")


def functions(sass: str) -> dict[str, list[tuple[int, str, str]]]:
    """Mangled name → [(address, opcode, line)]."""
    listing: dict[str, list[tuple[int, str, str]]] = {}
    current = None
    for line in sass.splitlines():
        if m := re.search(r"Function : (\S+)", line):
            current = m.group(1)
            listing[current] = []
        elif current and (m := INSTRUCTION.match(line)):
            listing[current].append((int(m.group(1), 16), m.group(2), line))
    return listing


def kernel_body(instructions: list[tuple[int, str, str]]) -> list[tuple[int, str, str]]:
    """The kernel's own instructions: without the functions it calls (add_splits_if_last is
    not inlined), which follow it from the first call's target on."""
    calls = [
        int(m.group(1), 16)
        for _, opcode, line in instructions
        if opcode.startswith("CALL") and (m := re.search(r"CALL[^0-9]*0x([0-9a-f]+)", line))
    ]
    return [i for i in instructions if not calls or i[0] < min(calls)]


def main_loop(instructions: list[tuple[int, str, str]]) -> list[tuple[int, str, str]]:
    """The instructions under the longest backward branch of the kernel's own code."""
    instructions = kernel_body(instructions)
    best: list[tuple[int, str, str]] = []
    for address, opcode, line in instructions:
        if opcode.startswith("BRA") and (m := re.search(r"BRA[^0-9]*0x([0-9a-f]+)", line)):
            target = int(m.group(1), 16)
            if target < address:
                body = [i for i in instructions if target <= i[0] <= address]
                best = body if len(body) > len(best) else best
    return best


def measure(variants: list[Variant], arch: str) -> list[dict]:
    report, sass = compile_and_disassemble(variants, arch)
    regs = resources(report)
    listing = functions(sass)
    rows = []
    for v in variants:
        names = [n for n in listing if v.mangled_stem() in n]
        if len(names) != 1:
            raise SystemExit(f"{v.template()}: found {len(names)} matching functions in the SASS")
        loop = main_loop(listing[names[0]])
        counts = collections.Counter(op.split(".")[0] for _, op, _ in loop)
        math_op, expected = v.expected_math()
        if counts[math_op] != expected:
            raise SystemExit(
                f"{v.template()}: the main loop has {counts[math_op]} {math_op}, the kernel's "
                f"structure implies {expected}: this script's model of the kernel is stale"
            )
        weights = v.weights_per_trip()
        per_weight = len(loop) / weights
        registers, spills = regs.get(names[0], (0, 0))
        rows.append(
            {
                "variant": v,
                "registers": registers,
                "blocks_per_sm": blocks_per_sm(registers),
                "spills": spills,
                "loop": len(loop),
                "weights": weights,
                "per_weight": per_weight,
                "dequantize": sum(counts[op] for op in DEQUANTIZE_OPS) / weights,
                "loads": counts["LDG"] / weights,
                "issue_us": MODEL_K * MODEL_N / 32 * per_weight / ISSUE_RATE * 1e6,
            }
        )
    return rows


def table(rows: list[dict], arch: str) -> str:
    lines = [
        f"## cuda_ext main loops, {arch} machine code (static counts, not timings)",
        "",
        "| kernel | activations | weights | M | scales | registers | blocks per SM | spill bytes "
        "| loop instructions | weights per loop (per thread) | instructions per weight "
        "| of which dequantize | loads per weight | issue µs at 4096×14336 (H100 model) "
        "| weight read µs |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        v = r["variant"]
        m = f"1–{v.rows}" if v.kernel == "mma" else ("1" if v.rows == 1 else f"≤ {v.rows}")
        lines.append(
            f"| {'tensor cores' if v.kernel == 'mma' else 'GEMV'} | {v.dtype} | INT{v.bits} | {m} "
            f"| {v.scales if v.kernel == 'mma' else 'per weight'} "
            f"| {r['registers']} | {r['blocks_per_sm']} | {r['spills']} | {r['loop']} "
            f"| {r['weights']} "
            f"| {r['per_weight']:.2f} | {r['dequantize']:.2f} | {r['loads']:.3f} "
            f"| {r['issue_us']:.1f} | {WEIGHT_READ_US[v.bits]} |"
        )
    return "\n".join(lines)


# plan_mma itself, compiled for the host: the grid each shape gets is the header's, not a copy.
PLAN_PROGRAM = r"""
#include <cstdio>

#include "device_environment.cuh"
#include "dequant_matmul_kernels.cuh"

// Reads lines "M N K group_len bits sm_count blocks_per_sm";
// writes "m_rows scales blocks_n splits sum_in_kernel".
int main() {
  int M, N, K, group_len, bits, sm_count, blocks_per_sm;
  while (std::scanf("%d %d %d %d %d %d %d", &M, &N, &K, &group_len, &bits, &sm_count,
                    &blocks_per_sm) == 7) {
    const auto choice = compress_kernels::choose_mma_kernel(M, K, group_len, bits);
    const auto plan = compress_kernels::plan_mma(choice, M, N, K, bits, sm_count, blocks_per_sm);
    std::printf("%d %d %d %d %d\n", plan.kernel.m_rows, static_cast<int>(plan.kernel.scales),
                plan.blocks_n, plan.splits, plan.sum_in_kernel);
  }
  return 0;
}
"""


class PlanProgram:
    """plan_mma compiled for the host into `directory`; called with queries (M, N, K,
    group_len, bits, sm_count, blocks_per_sm), it answers (m_rows, ScaleMode value, blocks_n,
    splits, sum_in_kernel) for each."""

    def __init__(self, directory: Path) -> None:
        source, self.program = directory / "plans.cu", directory / "plans"
        source.write_text(PLAN_PROGRAM)
        command = [find_tool("nvcc"), *NVCC_FLAGS, f"-I{KERNELS_DIR}", str(source)]
        built = subprocess.run([*command, "-o", str(self.program)], capture_output=True, text=True)
        if built.returncode != 0:
            raise SystemExit(f"nvcc failed on the plan program:\n{built.stderr[-4000:]}")

    def __call__(self, queries: list[tuple[int, ...]]) -> list[tuple[int, ...]]:
        lines = "".join(" ".join(map(str, q)) + "\n" for q in queries)
        ran = subprocess.run(
            [str(self.program)], input=lines, capture_output=True, text=True, check=True
        )
        plans = [tuple(int(field) for field in line.split()) for line in ran.stdout.splitlines()]
        if len(plans) != len(queries):
            raise SystemExit(f"the plan program answered {len(plans)} of {len(queries)} queries")
        return plans


def plan_table(rows: list[dict]) -> str:
    """INT4 g128 grids on the Llama-3-8B shapes: blocks launched against the blocks the SMs
    hold at once (from the registers above), with plan_mma's one-wave cap and without it."""
    held = {
        (v.dtype, v.rows, v.scales): r["blocks_per_sm"]
        for r in rows
        if (v := r["variant"]).kernel == "mma" and v.bits == 4
    }
    names = list(SCALE_MODES)
    cases = [(m, n, k) for k, n in PLAN_SHAPES for m in PLAN_ROWS]
    with tempfile.TemporaryDirectory() as tmp:
        plans = PlanProgram(Path(tmp))
        free = plans([(m, n, k, 128, 4, SM_COUNT, 0) for m, n, k in cases])
        slots = {dtype: [held[(dtype, p[0], names[p[1]])] for p in free] for dtype in DTYPES}
        capped = {
            dtype: plans(
                [(*case, 128, 4, SM_COUNT, b) for case, b in zip(cases, slots[dtype], strict=True)]
            )
            for dtype in DTYPES
        }

    def grid(plan: tuple[int, ...], held_per_sm: int) -> str:
        blocks = plan[2] * plan[3]
        return f"{plan[2]} × {plan[3]} = {blocks} ({blocks / (SM_COUNT * held_per_sm):.2f})"

    def summed(plan: tuple[int, ...]) -> str:
        return "–" if plan[3] == 1 else "in the kernel" if plan[4] else "second kernel"

    lines = [
        f"## mma_gemm grids, INT4 g128 on {SM_COUNT} SMs: blocks (waves of the SMs' slots)",
        "",
        "| K × N | M | kernel | blocks per SM fp16 / bf16 | without the one-wave cap, fp16 "
        "| fp16 | bf16 | splits added |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for i, (m, n, k) in enumerate(cases):
        fp16, bf16 = slots["float16"][i], slots["bfloat16"][i]
        lines.append(
            f"| {k} × {n} | {m} | {free[i][0]} rows, {names[free[i][1]]} | {fp16} / {bf16} "
            f"| {grid(free[i], fp16)} | {grid(capped['float16'][i], fp16)} "
            f"| {grid(capped['bfloat16'][i], bf16)} | {summed(capped['float16'][i])} |"
        )
    return "\n".join(lines)


def check(rows: list[dict]) -> list[str]:
    """What breaks the kernels' design rules: spills, and decode steps cheaper on the GEMV."""
    problems = [
        f"{r['variant'].template()} spills {r['spills']} bytes" for r in rows if r["spills"]
    ]
    for dtype in DTYPES:
        for bits in (4, 8):
            # The tensor cores' costliest mode (scales on the weights: any group size).
            cost = {
                (r["variant"].kernel, r["variant"].rows): r["per_weight"]
                for r in rows
                if r["variant"].dtype == dtype
                and r["variant"].bits == bits
                and r["variant"].scales == "weights"
            }
            if cost[("mma", 8)] > cost[("gemv", 1)]:
                problems.append(
                    f"{dtype} INT{bits}: the tensor-core kernel at M ≤ 8 issues "
                    f"{cost[('mma', 8)]:.2f} instructions per weight, the GEMV at M = 1 "
                    f"{cost[('gemv', 1)]:.2f}: revisit CUDA_GEMV_ROWS in compress/kernels.py"
                )
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="sm_90", help="nvcc -arch (default sm_90)")
    parser.add_argument("--check", action="store_true", help="fail on spills or a costlier mma")
    args = parser.parse_args(argv)
    rows = measure(VARIANTS, args.arch)
    print(table(rows, args.arch))
    print()
    print(plan_table(rows))
    problems = check(rows) if args.check else []
    for problem in problems:
        sys.stderr.write(f"kernel_sass: {problem}\n")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
