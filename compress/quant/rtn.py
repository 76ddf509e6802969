"""Round-to-nearest weight quantization: a pure function on one weight."""

from __future__ import annotations

import torch

from compress.quant.packing import PackedWeight
from compress.quant.primitives import QuantSpec, RangeSearch, choose_qparams, quantize


def rtn_quantize(
    weight: torch.Tensor,
    spec: QuantSpec,
    scale_dtype: torch.dtype,
    *,
    search: RangeSearch | None = None,
) -> PackedWeight:
    """(N, K) float weight → packed integers, scales of `scale_dtype`, zero points.

    `search` picks each group's range by least quantization error instead of min/max.
    """
    qparams = choose_qparams(weight, spec, scale_dtype, search=search)
    q = quantize(weight, qparams, spec)
    return PackedWeight.from_quantized(q, qparams.scale, qparams.zero, spec.bits, spec.symmetric)
