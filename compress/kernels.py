"""`compress::dequant_matmul`: the one op every quantized Linear calls.

The default implementation is pure PyTorch (unpack → dequantize in the activation dtype →
matmul) and runs on every device. A faster implementation for a device registers against the
same op (`torch.library.register_kernel("compress::dequant_matmul", "cuda")` from `cuda_ext`),
so callers never choose kernels by hardware. The fake (meta) implementation lets
`torch.compile` and meta-device tracing see the output shape without running anything.
"""

from __future__ import annotations

import torch

from compress.quant.config import PER_CHANNEL
from compress.quant.packing import unpack_weight, unpack_zero_points


def check_dequant_matmul_args(
    x: torch.Tensor,
    weight_packed: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    bits: int,
    group_size: int,
    in_features: int,
) -> None:
    """Shape/dtype checks shared by every implementation; errors name the shapes."""
    out_features = weight_packed.shape[0]
    if x.shape[-1] != in_features:
        raise ValueError(
            f"dequant_matmul: x has {x.shape[-1]} features, the weight expects {in_features} "
            f"(x {tuple(x.shape)}, weight_packed {tuple(weight_packed.shape)})"
        )
    if weight_packed.dtype != torch.int32:
        raise ValueError(f"dequant_matmul: weight_packed must be int32, got {weight_packed.dtype}")
    if weight_packed.shape[1] * (32 // bits) != in_features:
        raise ValueError(
            f"dequant_matmul: weight_packed {tuple(weight_packed.shape)} does not hold "
            f"{in_features} {bits}-bit values per row"
        )
    groups = 1 if group_size == PER_CHANNEL else in_features // group_size
    if group_size != PER_CHANNEL and in_features % group_size:
        raise ValueError(
            f"dequant_matmul: group_size {group_size} does not divide K={in_features}"
        )
    if tuple(scale.shape) != (out_features, groups):
        raise ValueError(
            f"dequant_matmul: scale {tuple(scale.shape)} != (N={out_features}, G={groups})"
        )
    if zero_point is not None and zero_point.shape[1] != groups:
        raise ValueError(f"dequant_matmul: zero_point {tuple(zero_point.shape)} has != {groups} groups")


def dequantize_packed(
    weight_packed: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    bits: int,
    group_size: int,
    in_features: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Packed tensors → (N, K) weight of `dtype`."""
    out_features = weight_packed.shape[0]
    q = unpack_weight(weight_packed, bits, in_features)  # (N, K) int32
    groups = scale.shape[1]
    if zero_point is None:
        centered = q - (1 << (bits - 1))
        centered = centered.view(out_features, groups, -1)
    else:
        zero = unpack_zero_points(zero_point, bits, out_features)  # (N, G)
        centered = q.view(out_features, groups, -1) - zero.unsqueeze(-1)
    weight = centered.to(dtype) * scale.to(dtype).unsqueeze(-1)
    return weight.view(out_features, in_features)


@torch.library.custom_op("compress::dequant_matmul", mutates_args=())
def dequant_matmul(
    x: torch.Tensor,
    weight_packed: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    bits: int,
    group_size: int,
    in_features: int,
) -> torch.Tensor:
    """y = x @ dequantize(W)ᵀ for x (..., K) → (..., N), computed in x's dtype."""
    check_dequant_matmul_args(x, weight_packed, scale, zero_point, bits, group_size, in_features)
    weight = dequantize_packed(
        weight_packed, scale, zero_point, bits, group_size, in_features, x.dtype
    )
    return torch.nn.functional.linear(x, weight)


@dequant_matmul.register_fake
def _dequant_matmul_fake(
    x: torch.Tensor,
    weight_packed: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    bits: int,
    group_size: int,
    in_features: int,
) -> torch.Tensor:
    check_dequant_matmul_args(x, weight_packed, scale, zero_point, bits, group_size, in_features)
    return x.new_empty((*x.shape[:-1], weight_packed.shape[0]))
