"""Round-to-nearest weight quantization: a pure function on one weight."""

from __future__ import annotations

import torch

from compress.quant.packing import PackedWeight
from compress.quant.primitives import QuantSpec, choose_qparams, quantize


def rtn_quantize(weight: torch.Tensor, spec: QuantSpec, scale_dtype: torch.dtype) -> PackedWeight:
    """(N, K) float weight → packed integers, scales of `scale_dtype`, zero points."""
    qparams = choose_qparams(weight, spec, scale_dtype)
    q = quantize(weight, qparams, spec)
    return PackedWeight.from_quantized(q, qparams.scale, qparams.zero, spec.bits, spec.symmetric)
