"""`to_int_quantized`: the tensor mapping behind `compress export --format int-quantized`."""

from __future__ import annotations

import torch

from compress.export import to_int_quantized
from compress.quant.packing import PackedWeight
from compress.quant.primitives import QuantSpec, choose_qparams, quantize


def test_every_tensor_is_kept_or_converted():
    spec = QuantSpec(4, 32, False)
    weight = torch.randn(16, 64, generator=torch.Generator().manual_seed(0))
    qparams = choose_qparams(weight, spec)
    codes = quantize(weight, qparams, spec)
    packed = PackedWeight.from_quantized(codes, qparams.scale, qparams.zero, 4, False)
    layer = "model.layers.0.self_attn.q_proj"
    state = {
        f"{layer}.weight_packed": packed.weight_packed,
        f"{layer}.weight_scale": packed.weight_scale,
        f"{layer}.weight_zero_point": packed.weight_zero_point,
        f"{layer}.weight_shape": torch.tensor([16, 64]),
        f"{layer}.bias": torch.randn(16),  # e.g. Qwen's q/k/v carry biases
        "model.norm.weight": torch.ones(64),
    }
    out = to_int_quantized(state, {layer: spec})
    assert set(out) == {
        f"{layer}.weight",
        f"{layer}.weight_scale",
        f"{layer}.weight_zero_point",
        f"{layer}.bias",
        "model.norm.weight",
    }
    assert torch.equal(out[f"{layer}.weight"], (codes - 8).to(torch.int8))
    assert torch.equal(out[f"{layer}.weight_zero_point"], (qparams.zero - 8).to(torch.int8))
    assert torch.equal(out[f"{layer}.bias"], state[f"{layer}.bias"])
