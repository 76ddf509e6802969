"""Quantized weights for the kernel tests: packed as an artifact stores them, with the float32
dequantized weight every kernel is checked against."""

from __future__ import annotations

import torch

from compress.quant.config import PER_CHANNEL
from compress.quant.packing import PackedWeight
from compress.quant.primitives import QuantSpec, choose_qparams, dequantize, quantize

# The schemes every kernel is checked on: INT4 groups 32 / 64 / 128 and per channel, INT8 per
# channel, symmetric and asymmetric. Between them they take every ScaleMode of the tensor-core
# kernel (cuda_ext/dequant_matmul_kernels.cuh).
SCHEMES = [
    QuantSpec(4, 32, True),
    QuantSpec(4, 64, False),
    QuantSpec(4, 128, False),
    QuantSpec(4, PER_CHANNEL, False),
    QuantSpec(8, PER_CHANNEL, True),
    QuantSpec(8, PER_CHANNEL, False),
]

# Group sizes the six SCHEMES leave out, each on one shape (N, K): INT4 g256 (a group spans
# two chunks: scales per chunk), INT4 g96 and INT8 g48 (groups that straddle chunks: scales on
# the weights), INT8 g64 (per chunk); and groups shorter than the tensor-core kernel's slice
# (INT4 g8, INT8 g4), which only the GEMV and dequantize take.
MORE_SCHEMES = [
    (QuantSpec(4, 256, False), 72, 1024),
    (QuantSpec(4, 96, True), 40, 576),
    (QuantSpec(8, 48, False), 40, 576),
    (QuantSpec(8, 64, True), 136, 512),
    (QuantSpec(4, 8, False), 13, 352),
    (QuantSpec(8, 4, True), 13, 208),
]


def packed_case(
    n: int, k: int, spec: QuantSpec, dtype: torch.dtype, seed: int
) -> tuple[PackedWeight, torch.Tensor]:
    """A fresh random (n, k) weight (never zeros) → (its packed form, dequantized in float32)."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(n, k, generator=gen) * 0.05
    qparams = choose_qparams(weight, spec, dtype)
    q = quantize(weight, qparams, spec)
    packed = PackedWeight.from_quantized(q, qparams.scale, qparams.zero, spec.bits, spec.symmetric)
    return packed, dequantize(q, qparams, spec, dtype=torch.float32)


def same_version(a: torch.Tensor, b: torch.Tensor) -> None:
    """Bring the two tensors' version counters level, by in-place no-ops."""
    while a._version != b._version:
        (a if a._version < b._version else b).mul_(1)
