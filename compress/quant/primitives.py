"""Affine integer quantization with one `group_size` vocabulary for every bit width.

Stored integers are *unsigned*: `q ∈ [0, 2^bits - 1]`, with a zero point `z` in the same
range, and `dequantize(q) = (q - z) · scale`. Symmetric quantization is the special case
`z = 2^(bits-1)` (so `q - z` is the signed value in `[-2^(bits-1), 2^(bits-1) - 1]`). This is
exactly compressed-tensors' convention (signed values + an offset of `2^(bits-1)` when packed).

Shapes: a weight is `(N, K)` (out_features, in_features); with `G = K / group_size` groups
(`G = 1` per channel), scales and zero points are `(N, G)`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from compress.quant.config import PER_CHANNEL


@dataclass(frozen=True)
class QuantSpec:
    bits: int
    group_size: int  # PER_CHANNEL (-1) or a positive divisor of in_features
    symmetric: bool
    # How scales are chosen, not how they are stored: excluded from equality so that a layer
    # quantized this way is the same scheme as one loaded back from its artifact.
    fp16_exact: bool = field(default=False, compare=False)

    @property
    def qmax(self) -> int:
        return (1 << self.bits) - 1

    @property
    def mid(self) -> int:
        """The implicit zero point of symmetric quantization."""
        return 1 << (self.bits - 1)

    def group_len(self, in_features: int) -> int:
        return in_features if self.group_size == PER_CHANNEL else self.group_size

    def num_groups(self, in_features: int) -> int:
        return in_features // self.group_len(in_features)

    def divides(self, in_features: int) -> bool:
        return self.group_size == PER_CHANNEL or in_features % self.group_size == 0


@dataclass(frozen=True)
class QParams:
    scale: torch.Tensor  # (N, G), storage dtype
    zero: torch.Tensor  # (N, G), int32, in [0, qmax]


def _grouped(weight: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """(N, K) → (N, G, K/G)."""
    n, k = weight.shape
    if not spec.divides(k):
        raise ValueError(f"group_size {spec.group_size} does not divide in_features {k}")
    return weight.reshape(n, spec.num_groups(k), spec.group_len(k))


def _round_up_to_dtype(scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Cast positive scales to `dtype`, rounding *up*.

    A scale rounded down would shrink the grid below the weights' range and clip the extremes
    by more than half a step; rounding up keeps |w - dequantize(quantize(w))| ≤ scale / 2.
    """
    stored = scale.to(dtype)
    if dtype == torch.float32:
        return stored
    too_small = stored.to(torch.float32) < scale
    # The next representable value above a positive finite float is its bit pattern + 1.
    bumped = (stored.view(torch.int16) + 1).view(dtype)
    return torch.where(too_small, bumped, stored)


# A scale with 7 significant bits times a zero point below 16 (4 bits) has at most 11: fp16's
# precision. 2^-18 is the smallest such scale whose lowest bit (2^-24) fp16 still represents.
FP16_EXACT_BITS = 7
FP16_EXACT_MIN = 2.0**-18


def round_up_fp16_exact(scale: torch.Tensor) -> torch.Tensor:
    """Positive scales rounded *up* to 7 significant bits and at least 2^-18 (float32): then s
    and s·z (z < 16) are exact in fp16, bf16 and float32 alike (see `_round_up_to_dtype` for
    why up)."""
    s = scale.to(torch.float32).clamp_min(FP16_EXACT_MIN)
    _, exponent = torch.frexp(s)  # s = mantissa · 2^exponent, mantissa in [0.5, 1)
    ulp = torch.ldexp(torch.ones_like(s), exponent - FP16_EXACT_BITS)
    return torch.ceil(s / ulp) * ulp


@dataclass(frozen=True)
class RangeSearch:
    """The MSE observer: shrink each group's range and keep the grid with the least error.

    Min/max scales spend grid steps on a group's few extreme weights; a slightly clipped range
    rounds the many others more finely. For each shrink factor in `steps` values from 1.0 down
    to `min_shrink`, the group is quantized and Σ |w − ŵ|^norm measured (weighted per input
    feature by `importance` when given, e.g. the Hessian diagonal); the lowest wins. The
    defaults (20 steps to 0.8, norm 2.4) are those of GPTQ's reference code and llm-compressor.
    """

    steps: int = 20
    min_shrink: float = 0.8
    norm: float = 2.4


def _scale_for(step: torch.Tensor, spec: QuantSpec, scale_dtype: torch.dtype) -> torch.Tensor:
    """The stored scale for a wanted step: at least the dtype's smallest normal, rounded up."""
    scale = _round_up_to_dtype(step.clamp_min(torch.finfo(scale_dtype).tiny), scale_dtype)
    if spec.fp16_exact:
        scale = round_up_fp16_exact(scale).to(scale_dtype)
    return scale


def _qparams_for_range(
    lo: torch.Tensor, hi: torch.Tensor, spec: QuantSpec, scale_dtype: torch.dtype
) -> QParams:
    """Scales and zero points whose grid spans [lo, hi] per group (lo ≤ 0 ≤ hi; symmetric
    specs use hi = absmax)."""
    if spec.symmetric:
        # Half the number of steps: the grid [-mid, mid - 1] covers ±absmax (the top value
        # rounds into the clamp by at most half a step), as in torchao and compressed-tensors.
        scale = _scale_for(hi / (spec.qmax / 2), spec, scale_dtype)
        zero = torch.full_like(scale, spec.mid, dtype=torch.int32)
    else:
        scale = _scale_for((hi - lo) / spec.qmax, spec, scale_dtype)
        zero = torch.round(-lo / scale.to(torch.float32)).clamp(0, spec.qmax).to(torch.int32)
    return QParams(scale=scale, zero=zero)


def _group_errors(
    groups: torch.Tensor,
    qparams: QParams,
    spec: QuantSpec,
    norm: float,
    importance: torch.Tensor | None,
) -> torch.Tensor:
    """Σ over each group of importance · |w − dequantize(quantize(w))|^norm: (N, G)."""
    scale = qparams.scale.to(torch.float32).unsqueeze(-1)
    zero = qparams.zero.to(torch.float32).unsqueeze(-1)
    q = (torch.round(groups / scale) + zero).clamp_(0, spec.qmax)
    error = ((q - zero).mul_(scale) - groups).abs_().pow_(norm)
    if importance is not None:
        error.mul_(importance.to(torch.float32).reshape(1, *groups.shape[1:]))
    return error.sum(dim=-1)


def choose_qparams(
    weight: torch.Tensor,
    spec: QuantSpec,
    scale_dtype: torch.dtype = torch.float32,
    *,
    search: RangeSearch | None = None,
    importance: torch.Tensor | None = None,
) -> QParams:
    """Min/max (asymmetric) or absmax (symmetric) scales and zero points per group.

    With `search`, each group's range is shrunk to the error-minimizing one (`RangeSearch`);
    `importance` (K,) weighs each input feature's error in that search.
    """
    groups = _grouped(weight.to(torch.float32), spec)  # (N, G, g)
    if spec.symmetric:
        hi = groups.abs().amax(dim=-1)
        lo = -hi
    else:
        lo = groups.amin(dim=-1).clamp_max(0.0)  # the grid always holds an exact 0.0
        hi = groups.amax(dim=-1).clamp_min(0.0)
    best = _qparams_for_range(lo, hi, spec, scale_dtype)
    if search is None:
        return best
    if importance is not None and importance.shape != (weight.shape[1],):
        raise ValueError(f"importance must be ({weight.shape[1]},), got {tuple(importance.shape)}")
    best_error = _group_errors(groups, best, spec, search.norm, importance)
    for shrink in torch.linspace(1.0, search.min_shrink, search.steps).tolist()[1:]:
        candidate = _qparams_for_range(lo * shrink, hi * shrink, spec, scale_dtype)
        error = _group_errors(groups, candidate, spec, search.norm, importance)
        better = error < best_error
        best = QParams(
            scale=torch.where(better, candidate.scale, best.scale),
            zero=torch.where(better, candidate.zero, best.zero),
        )
        best_error = torch.where(better, error, best_error)
    return best


def quantize(weight: torch.Tensor, qparams: QParams, spec: QuantSpec) -> torch.Tensor:
    """(N, K) float → (N, K) int32 in [0, qmax]."""
    groups = _grouped(weight.to(torch.float32), spec)
    scale = qparams.scale.to(torch.float32).unsqueeze(-1)
    zero = qparams.zero.unsqueeze(-1)
    q = torch.round(groups / scale) + zero
    return q.clamp(0, spec.qmax).to(torch.int32).reshape(weight.shape)


def dequantize(
    q: torch.Tensor, qparams: QParams, spec: QuantSpec, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """(N, K) int → (N, K) float of `dtype`: (q - zero) · scale, computed in `dtype`."""
    groups = _grouped(q, spec)
    centered = (groups.to(torch.int32) - qparams.zero.unsqueeze(-1)).to(dtype)
    return (centered * qparams.scale.to(dtype).unsqueeze(-1)).reshape(q.shape)


def fake_quantize(weight: torch.Tensor, spec: QuantSpec, scale_dtype: torch.dtype) -> torch.Tensor:
    """Quantize then dequantize (float32 result): what the stored weight will compute."""
    qparams = choose_qparams(weight, spec, scale_dtype)
    return dequantize(quantize(weight, qparams, spec), qparams, spec)
