"""The compiled `cuda_ext/` ops (`torch.ops.compress_cuda.*`): prebuilt, or built on first use.

`setup.py` compiles `cuda_ext/*.cu` into `compress/_cuda_ext*.so` when a CUDA-enabled torch
and nvcc are present at install time (`pip install --no-build-isolation -e .`). Where it was
not prebuilt, the first CUDA call builds it with `torch.utils.cpp_extension.load` (needs nvcc;
a minute or two, cached under torch's extension directory). The library registers its ops
with the dispatcher when loaded; it has no Python module of its own, so it is loaded with
`torch.ops.load_library`.

Where neither works (no nvcc, a CPU-only torch), `load()` returns False once, with the reason
logged, and `compress::dequant_matmul` keeps its pure-PyTorch implementation.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import logging
from pathlib import Path

import torch

log = logging.getLogger(__name__)

CUDA_EXT_DIR = Path(__file__).resolve().parents[1] / "cuda_ext"
SOURCES = sorted(CUDA_EXT_DIR.glob("*.cu"))
PREBUILT_MODULE = "compress._cuda_ext"
# sm_80 (A100) and sm_90 (H100): the targets the kernels are written for. setup.py passes the
# same flags (it cannot import this package while building it).
NVCC_FLAGS = [
    "-O3",
    "--use_fast_math",
    "-gencode=arch=compute_80,code=sm_80",
    "-gencode=arch=compute_90,code=sm_90",
]


def _prebuilt_path() -> str | None:
    spec = importlib.util.find_spec(PREBUILT_MODULE)
    return None if spec is None else spec.origin


def _jit_build() -> None:
    from torch.utils.cpp_extension import load

    if not SOURCES:
        raise RuntimeError("cuda_ext/*.cu not found (an installed wheel without sources?)")
    log.info("building the CUDA kernels from %s (first use; cached afterwards)", CUDA_EXT_DIR)
    # The name carries a digest of every file in cuda_ext/: torch's JIT cache hashes only the
    # listed sources, and the kernels live in a header (dequant_matmul_kernels.cuh).
    files = sorted(CUDA_EXT_DIR.glob("*.cu")) + sorted(CUDA_EXT_DIR.glob("*.cuh"))
    digest = hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()[:12]
    load(
        name=f"compress_cuda_ext_{digest}",
        sources=[str(s) for s in SOURCES],
        extra_cuda_cflags=NVCC_FLAGS,
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
    except Exception as exc:  # a build or load failure must not break the pure-PyTorch path
        log.warning("CUDA kernels unavailable, using the pure-PyTorch dequant_matmul: %s", exc)
        return False
    return hasattr(torch.ops.compress_cuda, "gemv")
