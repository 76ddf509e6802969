"""QuantLinear: a Linear layer that holds packed integer weights and calls the dequant op."""

from __future__ import annotations

import math

import torch
from torch import nn

import compress.kernels
from compress.quant.config import PER_CHANNEL
from compress.quant.packing import PackedWeight
from compress.quant.primitives import QuantSpec


class QuantLinear(nn.Module):
    """Weight-only quantized Linear; state-dict names follow compressed-tensors.

    Buffers (all persistent, so `state_dict()` is what goes to disk):
    `weight_packed`, `weight_scale`, `weight_zero_point` (asymmetric only), `weight_shape`.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        bias: bool,
        spec: QuantSpec,
        dtype: torch.dtype,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.spec = spec
        groups = spec.num_groups(in_features)
        words = in_features * spec.bits // 32
        self.register_buffer(
            "weight_packed", torch.zeros(out_features, words, dtype=torch.int32, device=device)
        )
        self.register_buffer(
            "weight_scale", torch.ones(out_features, groups, dtype=dtype, device=device)
        )
        if spec.symmetric:
            self.weight_zero_point = None
        else:
            zp_rows = math.ceil(out_features * spec.bits / 32)
            self.register_buffer(
                "weight_zero_point", torch.zeros(zp_rows, groups, dtype=torch.int32, device=device)
            )
        self.register_buffer(
            "weight_shape", torch.tensor([out_features, in_features], dtype=torch.int64)
        )
        self.bias = (
            nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False)
            if bias
            else None
        )

    @classmethod
    def from_packed(
        cls, packed: PackedWeight, spec: QuantSpec, bias: torch.Tensor | None, dtype: torch.dtype
    ) -> QuantLinear:
        out_features, words = packed.weight_packed.shape
        layer = cls(
            words * 32 // spec.bits,
            out_features,
            bias=bias is not None,
            spec=spec,
            dtype=dtype,
            device=packed.weight_packed.device,
        )
        layer.weight_packed.copy_(packed.weight_packed)
        layer.weight_scale.copy_(packed.weight_scale)
        if packed.weight_zero_point is not None:
            layer.weight_zero_point.copy_(packed.weight_zero_point)
        if bias is not None:
            layer.bias.data.copy_(bias)
        return layer

    def _packed_args(self) -> tuple:
        """The op's arguments after `x` (the same for the matmul and the plain dequantize)."""
        # Read from the buffer dict itself: nn.Module.__getattr__ costs about 0.5 µs a name,
        # paid by every quantized layer on every decode step (benchmarks/dispatch.py).
        buffers = self._buffers
        return (
            buffers["weight_packed"],
            buffers["weight_scale"],
            buffers.get("weight_zero_point"),
            self.spec.bits,
            self.spec.group_size,
            self.in_features,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.requires_grad and torch.is_grad_enabled():
            y = _DequantMatmulWithInputGrad.apply(x, *self._packed_args())
        else:  # inference: the op alone, with no autograd layer to pay for on every call
            y = compress.kernels.dequant_matmul(x, *self._packed_args())
        return y if self.bias is None else y + self.bias

    def dequantized_weight(self) -> torch.Tensor:
        """The (N, K) weight this layer computes with, in its scale dtype."""
        return compress.kernels.dequantize_packed(*self._packed_args(), self.weight_scale.dtype)

    def stored_bytes(self) -> int:
        """Bytes this layer's tensors take on disk (packed weight, scales, zeros, bias)."""
        tensors = [self.weight_packed, self.weight_scale, self.weight_shape]
        tensors += [t for t in (self.weight_zero_point, self.bias) if t is not None]
        return sum(t.numel() * t.element_size() for t in tensors)

    def extra_repr(self) -> str:
        granularity = (
            "per-channel"
            if self.spec.group_size == PER_CHANNEL
            else f"group={self.spec.group_size}"
        )
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bits={self.spec.bits}, {granularity}, symmetric={self.spec.symmetric}, "
            f"bias={self.bias is not None}"
        )


class _DequantMatmulWithInputGrad(torch.autograd.Function):
    """The op with a gradient for x (the packed weights are frozen): dL/dx = dL/dy · W, with W
    dequantized in the gradient's dtype. For adapters trained on a quantized model; the op
    itself has no autograd formula, so that inference skips the autograd layer."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, *packed_args) -> torch.Tensor:
        weight_packed, scale, zero_point, *ctx.sizes = packed_args
        ctx.save_for_backward(weight_packed, scale, zero_point)
        return compress.kernels.dequant_matmul(x, *packed_args)

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor) -> tuple:
        weight = compress.kernels.dequantize_packed(*ctx.saved_tensors, *ctx.sizes, grad_y.dtype)
        return (grad_y @ weight, *(None,) * (len(ctx.saved_tensors) + len(ctx.sizes)))
