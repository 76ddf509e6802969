"""Quantization-aware training: fake quantization with a straight-through estimator.

The forward sees each weight exactly as the quantize stage will store and compute it: the
weight cast to the recipe dtype, quantized with the same spec, observer and scale dtype
(`compress.quant.primitives`, the quantize stage's own functions), dequantized in that dtype.
The backward passes the gradient straight through to the float32 latent weight. After
training the parametrization is removed, leaving the latent weights; an RTN quantize stage
with the same settings then stores exactly the values the forward used in training.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

from compress.quant.primitives import QuantSpec, RangeSearch, choose_qparams, dequantize, quantize


class FakeQuantize(nn.Module):
    def __init__(self, spec: QuantSpec, dtype: torch.dtype, search: RangeSearch | None) -> None:
        super().__init__()
        self.spec, self.dtype, self.search = spec, dtype, search

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        stored = weight.detach().to(self.dtype)  # what the quantize stage will be given
        qparams = choose_qparams(stored, self.spec, self.dtype, search=self.search)
        q = quantize(stored, qparams, self.spec)
        computed = dequantize(q, qparams, self.spec, dtype=self.dtype).to(weight.dtype)
        return weight + (computed - weight).detach()  # value: computed; gradient: identity


def add_fake_quantization(
    linears: dict[str, nn.Linear], spec: QuantSpec, dtype: torch.dtype, search: RangeSearch | None
) -> None:
    for linear in linears.values():
        parametrize.register_parametrization(linear, "weight", FakeQuantize(spec, dtype, search))


def remove_fake_quantization(linears: dict[str, nn.Linear]) -> None:
    """Back to plain Linears holding the latent (unquantized) weights."""
    for linear in linears.values():
        if parametrize.is_parametrized(linear, "weight"):
            parametrize.remove_parametrizations(linear, "weight", leave_parametrized=False)
