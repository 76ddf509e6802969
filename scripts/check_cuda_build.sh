#!/usr/bin/env bash
# Proves cuda_ext/ compiles through setup.py: builds it against a CUDA torch (torch 2.14.1, CUDA
# 13.0) with nvcc, in a virtual environment of its own (.cuda-build-venv), and loads the result
# to check that its ops register. Needs no GPU. The machine's CPU venv (.venv) is not touched.
# TORCH_CUDA_VERSION and CUDA_BUILD_VENV pick another torch and venv (e.g. 2.11.0, the GPU
# machine's, in /tmp/venv211: PyPI's 2.11.0 wheel is the CUDA 13.0 build).
#
# Skips (exit 0, saying why) when nvcc or the CUDA torch is not available here; a compile or
# load failure fails (exit 1).
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH_CUDA_VERSION=${TORCH_CUDA_VERSION:-2.14.1}
VENV=${CUDA_BUILD_VENV:-.cuda-build-venv}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}

if ! command -v nvcc >/dev/null; then
    echo "cuda build check SKIPPED: no nvcc on PATH"
    exit 0
fi
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
if ! "${PIP[@]}" install "torch==$TORCH_CUDA_VERSION" numpy ninja setuptools wheel; then
    echo "cuda build check SKIPPED: torch==$TORCH_CUDA_VERSION (CUDA) is not installable here"
    exit 0
fi
rm -f compress/_cuda_ext*.so
MAX_JOBS=${MAX_JOBS:-2} "$VENV/bin/python" setup.py -q build_ext --inplace
SO=$(ls compress/_cuda_ext*.so)
trap 'rm -f "$SO"' EXIT
"$VENV/bin/python" - "$SO" <<'PY'
import sys

import torch

torch.ops.load_library(sys.argv[1])
ops = ("gemv", "mma_gemm", "dequantize", "mma_plan", "split_k_counter_sets", "kernel_architecture")
for op in ops:
    schema = getattr(torch.ops.compress_cuda, op).default._schema
    print(f"registered: {schema}")
    if op in ("mma_gemm", "mma_plan"):  # benchmarks/kernel.py --sweep-splits passes these
        last = [(a.name, a.default_value) for a in schema.arguments[-2:]]
        assert last == [("splits", 0), ("sum_in_kernel", None)], f"{op}: overrides are {last}"
PY
TOOLS=false
"${PIP[@]}" install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm && TOOLS=true
# What the library carries: machine code and PTX for exactly the targets compress/cuda_build.py
# names (sm_80, sm_90, sm_90's PTX unless TORCH_CUDA_ARCH_LIST says otherwise).
if $TOOLS; then
    "$VENV/bin/python" - "$SO" <<'PY'
import os
import re
import subprocess
import sys

sys.path[:0] = ["benchmarks", "compress"]
import cuda_build
from kernel_sass import find_tool

targets = cuda_build.prebuilt_targets(os.environ)
listed = subprocess.run(
    [find_tool("cuobjdump"), "--list-elf", "--list-ptx", sys.argv[1]],
    capture_output=True, text=True, check=True,
).stdout
elf = sorted(set(re.findall(r"\.sm_(\w+)\.cubin", listed)))
ptx = sorted(set(re.findall(r"\.sm_(\w+)\.ptx", listed)))
print(f"machine code for sm_{', sm_'.join(elf)}; PTX for sm_{', sm_'.join(ptx) or '(none)'}")
assert elf == sorted(t.name for t in targets), f"machine code {elf}, targets {targets}"
assert ptx == sorted(t.name for t in targets if t.ptx), f"PTX {ptx}, targets {targets}"
PY
fi
rm -f "$SO"
# The kernels' machine code: main-loop instructions per weight, no spills, decode steps no
# costlier on the tensor cores than on the GEMV (benchmarks/kernel_sass.py --check).
if $TOOLS; then
    "$VENV/bin/python" benchmarks/kernel_sass.py --check
else
    echo "kernel machine-code and target checks SKIPPED: cuobjdump / nvdisasm are not installable here"
fi
echo "cuda build check PASSED: cuda_ext compiles with nvcc $(nvcc --version | sed -n 's/.*release \([0-9.]*\).*/\1/p') against torch $TORCH_CUDA_VERSION"
