#!/usr/bin/env bash
# Issue 4's GPU checks in one call, the deliverables first, so that a run cut short by its
# time limit still brings them back: build cuda_ext, run the CUDA kernel tests and the decode
# benchmark's tests (its CUDA-graph step), then the kernel benchmark (Llama-3-8B shapes), the
# decode benchmark (a random ~1B Llama), the tensor-core kernel at every split of K against its
# launch plan's (splits.md), and the host cost per quantized layer call. What needs no GPU
# stays off the device's scarce time: the emulated kernel tests and the machine-code counts
# (benchmarks/kernel_sass.py) run in CI.
# Logs and tables go to $OUT (the device tool's result folder) or runs/gpu-check.
#
# On a CUDA machine with torch, nvcc and pytest (the device tool's H200 image has all three):
#     bash scripts/gpu_check.sh
# Python packages compress needs that the image lacks travel as wheels in .whl/ (ignored by
# git); fetch them first, on a machine with pip access:
#     bash scripts/gpu_check.sh --fetch-wheels
# and name .whl in the device call's carry. Give the call a timeout that leaves room for the
# first compile of the kernels (about a minute on 2 cores here).
set -uo pipefail
cd "$(dirname "$0")/.."

WHEELS=(pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5)

if [ "${1:-}" = "--fetch-wheels" ]; then
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d .whl "${WHEELS[@]}"
    ls .whl
    exit
fi

OUT=${OUT:-runs/gpu-check}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} MAX_JOBS=${MAX_JOBS:-16}
status=0

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee "$OUT/device.txt"
python3 - <<'PY' 2>&1 | tee "$OUT/build.log" || status=1
import logging
import time

logging.basicConfig(level=logging.INFO)
start = time.perf_counter()
from compress import cuda_ops

assert cuda_ops.load(), "cuda_ext did not build or load"
print(f"cuda_ext built and loaded in {time.perf_counter() - start:.0f} s")
PY
python3 -m pytest -q -p no:cacheprovider tests/kernels/test_dequant_matmul_cuda.py \
    tests/stages/test_bench_decode.py 2>&1 | tee "$OUT/tests.log" || status=1
for scheme in "--bits 4 --group-size 128" "--bits 4 --group-size 128 --asymmetric --dtype bfloat16" \
    "--bits 8 --group-size -1"; do
    # shellcheck disable=SC2086  # the scheme is a list of arguments
    python3 benchmarks/kernel.py $scheme 2>&1 | tee -a "$OUT/kernel.md" || status=1
done
python3 benchmarks/decode.py --preset llama-1b 2>&1 | tee "$OUT/decode.md" || status=1
for scheme in "--bits 4 --group-size 128" "--bits 8 --group-size -1"; do
    # shellcheck disable=SC2086
    python3 benchmarks/kernel.py $scheme --sweep-splits 2>&1 | tee -a "$OUT/splits.md" || status=1
done
python3 benchmarks/dispatch.py 2>&1 | tee "$OUT/dispatch.md" || status=1
exit $status
