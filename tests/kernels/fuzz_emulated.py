"""A random search over shapes, schemes and launch plans for the emulated cuda_ext kernels.

The suite's emulator tests (test_dequant_matmul_emulated.py) pin chosen cases; this draws
fresh ones for as long as it is given: INT4 / INT8, group sizes the quantize stage accepts
(per channel, multiples of a slice, and groups shorter than one), symmetric or not, fp16 or
bf16, N in 1…300, K up to about 2048, M up to 64, and for the tensor-core kernel a small
device (1–8 SMs, so K is split), a forced split or summing rule, a withheld counter set and a
shuffled block order. Every case runs between NaN guard bands against the float32 reference
(dequantize: bit for bit). A run prints each failure and ends with a summary; its exit code is
the number of failures (capped at 1), so it can gate a change to the kernels.

    .venv/bin/python -m tests.kernels.fuzz_emulated [--seconds 300 | --cases N] [--seed 0]
"""

from __future__ import annotations

import argparse
import logging
import math
import random
import sys
import time
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from compress import kernels
from compress.kernels import CUDA_GEMV_MAX_ROWS, CUDA_MMA_MAX_ROWS
from compress.quant.config import PER_CHANNEL
from compress.quant.primitives import QuantSpec
from tests.kernels import cuda_emulator
from tests.kernels.test_dequant_matmul_emulated import (
    assert_dequantizes_bit_exact,
    assert_matches_reference,
    guarded,
    make_case,
)

log = logging.getLogger("fuzz_emulated")

# Group sizes per bit width: per channel, multiples of the tensor-core slice (32 k for INT4,
# 16 for INT8) and groups shorter than one or straddling chunks.
GROUPS = {
    4: (PER_CHANNEL, 8, 24, 32, 64, 96, 128, 160, 256),
    8: (PER_CHANNEL, 4, 12, 16, 48, 64, 128),
}


@dataclass
class Case:
    kernel: str  # "gemv", "mma_gemm" or "dequantize"
    spec: QuantSpec
    dtype: torch.dtype
    n: int
    k: int
    m: int
    options: dict[str, object] = field(default_factory=dict)


def draw(rng: random.Random) -> Case:
    bits = rng.choice((4, 8))
    group = rng.choice(GROUPS[bits])
    spec = QuantSpec(bits, group, rng.random() < 0.5)
    slice_k = kernels.mma_slice(bits)
    # K: a multiple of the group and of a 16-byte row of codes, as the quantize stage stores it.
    unit = slice_k if group == PER_CHANNEL else math.lcm(group, 32 if bits == 4 else 16)
    k = unit * rng.randint(1, max(1, 2048 // unit))
    kernel = rng.choice(("gemv", "mma_gemm", "mma_gemm", "dequantize"))
    if kernel == "mma_gemm" and not kernels.mma_takes_shape(bits, group, k):
        kernel = "gemv"  # the tensor-core kernel refuses groups shorter than its slice
    dtype = rng.choice((torch.float16, torch.bfloat16))
    m = rng.randint(1, CUDA_MMA_MAX_ROWS if kernel == "mma_gemm" else CUDA_GEMV_MAX_ROWS)
    options: dict[str, object] = {}
    if kernel == "mma_gemm":
        options = {"sm_count": rng.randint(1, 8), "blocks_per_sm": rng.randint(0, 4)}
        if rng.random() < 0.4:
            options["splits"] = rng.choice((1, 2, 3, 4, 8, 16, 64))
        if rng.random() < 0.4:
            options["sum_in_kernel"] = rng.random() < 0.5
        if rng.random() < 0.2:
            options["separate_sum"] = True
    return Case(kernel, spec, dtype, rng.randint(1, 300), k, m, options)


def check(emulator: cuda_emulator.EmulatedKernels, case: Case, seed: int) -> None:
    """Run the case; AssertionError where it misses the float32 reference (dequantize: bit
    for bit) or writes outside its output, RuntimeError where the emulator saw a problem."""
    spec, n, k, m, dtype = case.spec, case.n, case.k, case.m, case.dtype
    (weight_packed, scale, zero), reference = make_case(n, k, spec, dtype, seed=seed)
    args = (weight_packed, scale, zero, spec.bits, spec.group_size, k)
    if case.kernel == "dequantize":
        assert_dequantizes_bit_exact(emulator, args, reference, dtype)
        return
    x, _ = guarded(torch.randn(m, k, generator=torch.Generator().manual_seed(seed)).to(dtype))
    out, buffer = guarded(torch.full((m, n), float("nan"), dtype=dtype))
    getattr(emulator, case.kernel)(x, *args, out=out, **case.options)
    assert_matches_reference(out, buffer, x, reference, case.kernel)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=300.0)
    parser.add_argument("--cases", type=int, default=None, help="stop after this many instead")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    emulator = cuda_emulator.load()
    if isinstance(emulator, str):
        log.error("cannot build the CUDA emulator: %s", emulator)
        return 2
    rng = random.Random(args.seed)
    deadline = time.monotonic() + args.seconds
    counts: dict[str, int] = {}
    failures = 0
    with tqdm(desc="cases", unit=" case") as progress:
        while time.monotonic() < deadline and progress.n != args.cases:
            case = draw(rng)
            seed = rng.randrange(2**31)
            emulator.set_block_order(rng.randrange(2**31))
            counts[case.kernel] = counts.get(case.kernel, 0) + 1
            try:
                check(emulator, case, seed)
            except (AssertionError, RuntimeError) as exc:
                failures += 1
                log.error("FAILED (seed %d): %s: %s: %s", seed, case, type(exc).__name__, exc)
            progress.update()
    log.info(
        "%d cases (%s), %d failed; seed %d, %.0f s",
        sum(counts.values()),
        ", ".join(f"{kernel} {count}" for kernel, count in sorted(counts.items())),
        failures,
        args.seed,
        progress.format_dict["elapsed"],
    )
    return min(failures, 1)


if __name__ == "__main__":
    sys.exit(main())
