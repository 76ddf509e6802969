"""The compiled `cuda_ext/` ops (`torch.ops.compress_cuda.*`): prebuilt, or built on first use.

`setup.py` compiles `cuda_ext/*.cu` into `compress/_cuda_ext*.so` when a CUDA-enabled torch
and nvcc are present at install time (`pip install --no-build-isolation -e .`). Where it was
not prebuilt, the first CUDA call builds it with `torch.utils.cpp_extension.load` (needs nvcc;
a minute or two, cached under torch's extension directory). The library registers its ops
with the dispatcher when loaded; it has no Python module of its own, so it is loaded with
`torch.ops.load_library`.

Where neither works (no nvcc, a CPU-only torch, no GPU from sm_80 on), `load()` returns False
once, with the reason logged, and `compress::dequant_matmul` keeps its pure-PyTorch
implementation. Which GPUs each build targets is compress/cuda_build.py's: a loaded library
may still hold no code a device runs (a GPU before sm_80 beside a newer one, a prebuilt library
for other GPUs), so `runs_on(device)` asks the library once per device, and the op keeps the
pure-PyTorch path on a device where it says no, instead of failing at the first launch.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import logging
import os
from pathlib import Path

import torch

from compress import cuda_build

log = logging.getLogger(__name__)

CUDA_EXT_DIR = Path(__file__).resolve().parents[1] / "cuda_ext"
SOURCES = sorted(CUDA_EXT_DIR.glob("*.cu"))
PREBUILT_MODULE = "compress._cuda_ext"
# The ops compress/kernels.py calls: a library built from older sources may lack one.
REQUIRED_OPS = ("gemv", "mma_gemm", "dequantize", "kernel_architecture")


def _prebuilt_path() -> str | None:
    spec = importlib.util.find_spec(PREBUILT_MODULE)
    return None if spec is None else spec.origin


def _visible_devices() -> list[tuple[str, tuple[int, int]]]:
    return [
        (torch.cuda.get_device_name(i), torch.cuda.get_device_capability(i))
        for i in range(torch.cuda.device_count())
    ]


def _jit_build() -> None:
    from torch.utils.cpp_extension import load

    if not SOURCES:
        raise RuntimeError("cuda_ext/*.cu not found (an installed wheel without sources?)")
    targets = cuda_build.jit_targets(os.environ, _visible_devices())
    log.info(
        "building the CUDA kernels from %s for %s (first use; cached afterwards)",
        CUDA_EXT_DIR,
        ", ".join(f"sm_{t.name}{' + PTX' if t.ptx else ''}" for t in targets),
    )
    # The name carries a digest of every file in cuda_ext/ (torch's JIT cache hashes only the
    # listed sources, and the kernels live in a header) and the targets, so that builds for
    # other GPUs (one cache, several machines) do not replace each other.
    files = sorted(CUDA_EXT_DIR.glob("*.cu")) + sorted(CUDA_EXT_DIR.glob("*.cuh"))
    digest = hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()[:12]
    load(
        name=f"compress_cuda_ext_{digest}_{cuda_build.targets_tag(targets)}",
        sources=[str(s) for s in SOURCES],
        extra_cuda_cflags=cuda_build.nvcc_flags(targets),
        extra_cflags=["-O3"],
        is_python_module=False,
        verbose=False,
    )


@functools.cache
def load() -> bool:
    """Make `torch.ops.compress_cuda` available; False (logged once) when it cannot be."""
    if torch.version.cuda is None or not torch.cuda.is_available():
        return False
    try:
        prebuilt = _prebuilt_path()
        if prebuilt is not None:
            torch.ops.load_library(prebuilt)
        else:
            _jit_build()
        missing = [op for op in REQUIRED_OPS if not hasattr(torch.ops.compress_cuda, op)]
        if missing:
            raise RuntimeError(
                f"{prebuilt or 'the built library'} has no compress_cuda::{', '.join(missing)}: "
                "it was built from older sources (rebuild: pip install --no-build-isolation -e .)"
            )
    except Exception as exc:  # a build or load failure must not break the pure-PyTorch path
        log.warning("CUDA kernels unavailable, using the pure-PyTorch dequant_matmul: %s", exc)
        return False
    return True


@functools.cache
def runs_on(device: torch.device) -> bool:
    """Whether the loaded kernels hold code `device` runs (load() must have returned True).
    Logged once per device: which code it runs, or that it keeps the pure-PyTorch path."""
    with torch.cuda.device(device):
        architecture = int(torch.ops.compress_cuda.kernel_architecture())
    name = torch.cuda.get_device_name(device)
    major, minor = torch.cuda.get_device_capability(device)
    if architecture == 0:
        log.warning(
            "the CUDA kernels hold no code %s (sm_%d%d) runs (they need sm_80 or newer, and a "
            "build that targets it: compress/cuda_build.py); dequant_matmul uses the "
            "pure-PyTorch path there",
            name,
            major,
            minor,
        )
        return False
    log.info("CUDA kernels on %s (sm_%d%d): sm_%d code", name, major, minor, architecture)
    return True
