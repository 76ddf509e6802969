"""cuda_ext's kernels run on the CPU: `cuda_ext/dequant_matmul_kernels.cuh` compiled by the host
C++ compiler against `cuda_emulator.h` (fibers for CUDA threads, emulated barriers and
shuffles, the toolkit's own fp16/bf16 conversions), loaded with ctypes.

This proves on a machine without a GPU what a GPU run would: that the kernels compute the
right numbers for every shape, scheme and row count, and that their launch plans cover every
output. It says nothing about speed. Building needs g++ and the CUDA toolkit's headers
(`cuda_fp16.h`); `load()` returns the reason instead when either is missing.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import NamedTuple

import torch

HERE = Path(__file__).resolve().parent
KERNELS_DIR = HERE.parents[2] / "cuda_ext"
SOURCES = (
    HERE / "emulated_ops.cpp",
    HERE / "cuda_emulator.h",
    KERNELS_DIR / "dequant_matmul_kernels.cuh",
    KERNELS_DIR / "split_k_counters.cuh",
)
DTYPE_CODES = {torch.float16: 0, torch.bfloat16: 1}
# compress_kernels::ScaleMode, by its value.
SCALE_MODES = ("weights", "chunk", "end")
# compress_kernels::MmaPlan's fields, in the order emulated_plan_mma writes them.
PLAN_FIELDS = ("m_rows", "scales", "blocks_n", "splits", "chunks_per_split", "sum_in_kernel")


def cuda_include_dir() -> Path | None:
    """The CUDA toolkit's include directory: $CUDA_HOME, /usr/local/cuda, or beside nvcc."""
    candidates = [os.environ.get("CUDA_HOME"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc is not None:
        candidates.append(str(Path(nvcc).resolve().parents[1]))
    for root in filter(None, candidates):
        include = Path(root) / "include"
        if (include / "cuda_fp16.h").is_file():
            return include
    return None


def _build(include: Path) -> Path:
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in SOURCES)).hexdigest()[:16]
    library = Path(tempfile.gettempdir()) / "compress-cuda-emulator" / f"emulated_ops-{digest}.so"
    if library.is_file():
        return library
    library.parent.mkdir(parents=True, exist_ok=True)
    partial = library.with_suffix(f".{os.getpid()}.tmp")
    command = [
        "g++", "-std=c++17", "-O2", "-shared", "-fPIC", "-Wall", "-Wno-unknown-pragmas",
        f"-I{include}", f"-I{KERNELS_DIR}", str(SOURCES[0]), "-o", str(partial),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"building the CUDA emulator failed:\n{result.stderr[-4000:]}")
    partial.replace(library)  # atomic: a concurrent run never loads half a file
    return library


class CounterSetsRun(NamedTuple):
    """What `EmulatedKernels.counter_sets` saw: per step the set (None: none or a release) and
    whether it was leased to a capture then; the devices whose pool was made, in order; and
    per device (held by streams, held by captures, free) after the last step."""

    sets: list[int | None]
    new_leases: list[bool]
    pools_made: list[int]
    usage: list[tuple[int, int, int]]


def _forced_sum(sum_in_kernel: bool | None) -> int:
    """compress_kernels::MmaOverrides::sum_in_kernel: -1 the plan's rule, 1 / 0 forced."""
    return -1 if sum_in_kernel is None else int(sum_in_kernel)


class EmulatedKernels:
    """The emulated `compress_cuda` ops on CPU tensors, with the CUDA ops' arguments and shapes
    (x (..., K) → (..., N))."""

    def __init__(self, library: Path) -> None:
        self._lib = ctypes.CDLL(str(library))
        self.last_splits = 0
        self.last_scales = ""
        self.last_summed_in_kernel = False
        for name in ("emulated_gemv", "emulated_mma_gemm", "emulated_dequantize"):
            getattr(self._lib, name).restype = ctypes.c_char_p
        self._lib.emulated_small_divisor_errors.restype = ctypes.c_long

    @staticmethod
    def _ptr(tensor: torch.Tensor | None) -> ctypes.c_void_p:
        return ctypes.c_void_p(None if tensor is None else tensor.data_ptr())

    @staticmethod
    def _check(problem: bytes) -> None:
        if problem:
            raise RuntimeError(f"emulated kernel: {problem.decode()}")

    @staticmethod
    def _rows_and_output(x, weight_packed, in_features, out):
        """x as (M, K) rows and the (..., N) output, as the CUDA ops make them."""
        rows = x.reshape(-1, in_features).contiguous()
        n = weight_packed.shape[0]
        out = torch.empty(*x.shape[:-1], n, dtype=x.dtype) if out is None else out
        return rows, out, rows.shape[0], n

    def gemv(self, x, weight_packed, scale, zero_point, bits, group_size, in_features, out=None):
        """x (..., K) @ dequantized weight → (..., N), into `out` when given (to poison it)."""
        x, out, m, n = self._rows_and_output(x, weight_packed, in_features, out)
        group_len = in_features if group_size == -1 else group_size
        problem = self._lib.emulated_gemv(
            DTYPE_CODES[x.dtype], bits, self._ptr(x), self._ptr(weight_packed), self._ptr(scale),
            self._ptr(zero_point), self._ptr(out), m, n, in_features, group_len,
        )  # fmt: skip
        self._check(problem)
        return out

    def mma_gemm(
        self, x, weight_packed, scale, zero_point, bits, group_size, in_features, out=None,
        sm_count=132, blocks_per_sm=0, separate_sum=False, splits=0, sum_in_kernel=None,
    ):  # fmt: skip
        """The tensor-core path; `sm_count` stands in for the device's (an H100 has 132): a
        small one makes the plan split K across blocks. `blocks_per_sm` stands in for the
        kernel's occupancy (0: unknown, the grid is not capped at one wave). `splits` > 0 and
        `sum_in_kernel` (True / False) override the plan's choices, as the CUDA op's arguments
        do. `separate_sum` withholds the tile counters, so a second kernel adds the splits.
        Sets `last_splits`, `last_scales` (the plan's ScaleMode: "weights", "chunk" or "end")
        and `last_summed_in_kernel`."""
        x, out, m, n = self._rows_and_output(x, weight_packed, in_features, out)
        group_len = in_features if group_size == -1 else group_size
        ran_splits, scales, in_kernel = ctypes.c_int(0), ctypes.c_int(-1), ctypes.c_int(0)
        problem = self._lib.emulated_mma_gemm(
            DTYPE_CODES[x.dtype], bits, self._ptr(x), self._ptr(weight_packed), self._ptr(scale),
            self._ptr(zero_point), self._ptr(out), m, n, in_features, group_len, sm_count,
            blocks_per_sm, splits, _forced_sum(sum_in_kernel), int(separate_sum),
            ctypes.byref(ran_splits), ctypes.byref(scales), ctypes.byref(in_kernel),
        )  # fmt: skip
        self._check(problem)
        self.last_splits = ran_splits.value
        self.last_scales = SCALE_MODES[scales.value]
        self.last_summed_in_kernel = bool(in_kernel.value)
        return out

    def plan_mma(
        self, m, n, k, group_len, bits, sm_count, blocks_per_sm, splits=0, sum_in_kernel=None
    ) -> dict[str, int | str | bool]:
        """The tensor-core launch plan alone (compress_kernels::plan_mma), without running it;
        `splits` and `sum_in_kernel` override its choices as in `mma_gemm`."""
        fields = (ctypes.c_int * len(PLAN_FIELDS))()
        self._lib.emulated_plan_mma(
            m, n, k, group_len, bits, sm_count, blocks_per_sm, splits,
            _forced_sum(sum_in_kernel), fields,
        )  # fmt: skip
        plan: dict[str, int | str | bool] = dict(zip(PLAN_FIELDS, fields, strict=True))
        plan["scales"] = SCALE_MODES[int(plan["scales"])]
        plan["sum_in_kernel"] = bool(plan["sum_in_kernel"])
        return plan

    def counter_sets(
        self,
        sets_per_device: int,
        counters_per_set: int,
        steps: list[tuple[int, int, int | None, bool]],
        devices: int = 2,
    ) -> CounterSetsRun:
        """compress_kernels::SplitKCounterSets (cuda_ext/split_k_counters.cuh) driven through
        `steps`: (device, stream, capture id or None outside a capture, release). A step with
        release hands its capture's set back, as a destroyed graph does; any other is a
        launch, which gets a set (its index in the device's pool) or None."""
        n = len(steps)
        flat = (ctypes.c_longlong * (4 * n))(
            *(v for d, s, c, r in steps for v in (d, s, -1 if c is None else c, int(r)))
        )
        sets, new_leases = (ctypes.c_int * n)(), (ctypes.c_int * n)()
        pools_made = (ctypes.c_int * (devices + n))()
        usage = (ctypes.c_longlong * (3 * devices))()
        made = self._lib.emulated_counter_sets(
            sets_per_device, counters_per_set, n, flat, sets, new_leases, pools_made, devices,
            usage,
        )  # fmt: skip
        return CounterSetsRun(
            sets=[None if v < 0 else v for v in sets],
            new_leases=[bool(v) for v in new_leases],
            pools_made=list(pools_made[:made]),
            usage=[tuple(usage[3 * d : 3 * d + 3]) for d in range(devices)],
        )

    def set_block_order(self, seed: int) -> None:
        """Blocks of every later launch run in grid order (0) or shuffled by `seed`."""
        self._lib.emulated_set_block_order(ctypes.c_uint(seed))

    def dequantize(self, weight_packed, scale, zero_point, bits, group_size, in_features, out=None):
        n = weight_packed.shape[0]
        out = torch.empty(n, in_features, dtype=scale.dtype) if out is None else out
        group_len = in_features if group_size == -1 else group_size
        problem = self._lib.emulated_dequantize(
            DTYPE_CODES[scale.dtype], bits, self._ptr(weight_packed), self._ptr(scale),
            self._ptr(zero_point), self._ptr(out), n, in_features, group_len,
        )  # fmt: skip
        self._check(problem)
        return out

    def small_divisor_errors(self, divisor: int, n_end: int, ulps: int) -> int:
        """Quotients n / divisor, 0 ≤ n < n_end, that the kernels' SmallDivisor gets wrong
        when its float inverse is `ulps` units in the last place off."""
        return self._lib.emulated_small_divisor_errors(divisor, n_end, ulps)


def load() -> EmulatedKernels | str:
    """The emulated kernels, or why they cannot be built here."""
    if shutil.which("g++") is None:
        return "no g++ on PATH to compile the CUDA emulator"
    include = cuda_include_dir()
    if include is None:
        return "the CUDA toolkit headers (cuda_fp16.h) are not installed; set CUDA_HOME"
    return EmulatedKernels(_build(include))
