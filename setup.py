"""Build entry point.

A plain install (`pip install .`) is pure Python. When a CUDA-enabled torch and nvcc are
present at build time (install with `--no-build-isolation` so the build sees them), this is
where the `cuda_ext/` dequantize-matmul kernels are compiled into `compress/_cuda_ext*.so`
(loaded with `torch.ops.load_library` by compress/cuda_ops.py). Without them, the first CUDA
call builds them just in time, and a CPU install uses the pure-PyTorch implementation.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path

from setuptools import setup

CUDA_SOURCES = sorted(str(p) for p in Path("cuda_ext").glob("*.cu"))


def _cuda_build():
    """compress/cuda_build.py (the kernels' targets and nvcc flags), loaded by path: importing
    the package being built would import its dependencies."""
    spec = importlib.util.spec_from_file_location("cuda_build", Path("compress/cuda_build.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # where its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


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
    build = _cuda_build()
    sources = CUDA_SOURCES + sorted(str(p) for p in Path("cuda_ext").glob("*.cpp"))
    ext = CUDAExtension(
        "compress._cuda_ext",
        sources,
        extra_compile_args={
            "cxx": ["-O3"],
            # sm_80, sm_90 and sm_90's PTX, or TORCH_CUDA_ARCH_LIST's (compress/cuda_build.py).
            "nvcc": build.nvcc_flags(build.prebuilt_targets(os.environ)),
        },
    )
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = _cuda_extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
