"""Build entry point.

A plain install (`pip install .`) is pure Python. When a CUDA-enabled torch and nvcc are
present at build time (install with `--no-build-isolation` so the build sees them), this is
where the `cuda_ext/` dequantize-matmul kernels are compiled into `compress/_cuda_ext*.so`
(loaded with `torch.ops.load_library` by compress/cuda_ops.py). Without them, the first CUDA
call builds them just in time, and a CPU install uses the pure-PyTorch implementation.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from setuptools import setup

CUDA_SOURCES = sorted(str(p) for p in Path("cuda_ext").glob("*.cu"))


def _cuda_extensions() -> tuple[list, dict]:
    if not CUDA_SOURCES or shutil.which("nvcc") is None:
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CUDAExtension
    except ImportError:  # isolated build without torch: pure-Python install
        return [], {}
    if torch.version.cuda is None:
        return [], {}
    sources = CUDA_SOURCES + sorted(str(p) for p in Path("cuda_ext").glob("*.cpp"))
    ext = CUDAExtension(
        "compress._cuda_ext",
        sources,
        extra_compile_args={
            "cxx": ["-O3"],
            # The same flags as compress/cuda_ops.NVCC_FLAGS (the JIT build).
            "nvcc": [
                "-O3",
                "--use_fast_math",
                "-gencode=arch=compute_80,code=sm_80",
                "-gencode=arch=compute_90,code=sm_90",
            ],
        },
    )
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = _cuda_extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
