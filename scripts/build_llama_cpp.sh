#!/usr/bin/env bash
# Builds llama.cpp (vendored by llama-cpp-python) into .venv-llama, for benchmarks/gguf_export.py.
# Never part of the test setup: it compiles for minutes and no test needs it.
#
# Why these flags: this CPU advertises AMX, and a GGML_NATIVE=ON build segfaults at the first
# decode here. Naming the ISA extensions ourselves (AVX2, AVX-512, VNNI, BF16) with AMX off
# gives the same kernels llama.cpp would pick natively, minus the crashing one.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VERSION=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
[ -x .venv-llama/bin/python ] || "$PYTHON" -m venv .venv-llama
PIP=(.venv-llama/bin/python -m pip --disable-pip-version-check -q)
"${PIP[@]}" install --upgrade pip
FLAGS=(
  -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON
  -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON
  -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF
)
CMAKE_ARGS="${FLAGS[*]}" CMAKE_BUILD_PARALLEL_LEVEL=${JOBS:-2} \
  "${PIP[@]}" install --no-binary llama-cpp-python "llama-cpp-python==${VERSION}" numpy
echo "llama.cpp is built in .venv-llama ($(.venv-llama/bin/python -c 'import llama_cpp; print("llama-cpp-python", llama_cpp.__version__)'))"
