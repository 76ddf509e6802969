"""MatMulNBits tensors from our packed layers: the same integers, scales and zero points, only
rearranged (and repeated where one group spans several blocks)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from compress.errors import ArtifactError
from compress.onnx.graph import NBitsWeight, block_size_for, to_matmul_nbits
from compress.quant.config import PER_CHANNEL
from compress.quant.linear import QuantLinear
from compress.quant.primitives import QuantSpec
from compress.quant.rtn import rtn_quantize

pytest.importorskip("onnx", reason="the onnx extra is not installed")


def unpack_bytes(data: np.ndarray, bits: int, count: int) -> np.ndarray:
    """(R, bytes) uint8 → (R, count) codes, low bits first: MatMulNBits' reading of a blob."""
    if bits == 8:
        return data[:, :count].astype(np.int64)
    codes = np.stack([data & 0x0F, data >> 4], axis=-1).reshape(data.shape[0], -1)
    return codes[:, :count].astype(np.int64)


def dequantize_nbits(w: NBitsWeight) -> np.ndarray:
    """What ONNX Runtime computes with: (q − zero) · scale per block, written from the spec."""
    n, k, block = w.out_features, w.in_features, w.block_size
    k_blocks = k // block
    codes = unpack_bytes(w.packed.reshape(n, -1), w.bits, k)
    if w.zero_points is None:
        zeros = np.full((n, k_blocks), 1 << (w.bits - 1))
    else:
        zeros = unpack_bytes(w.zero_points, w.bits, k_blocks)
    blocks = (codes.reshape(n, k_blocks, block) - zeros[..., None]) * w.scales[..., None]
    return blocks.reshape(n, k).astype(np.float32)  # one rounding, as float32 math does


def quant_linear(n: int, k: int, spec: QuantSpec, seed: int = 0) -> QuantLinear:
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(n, k, generator=gen)
    weight[0] = weight[0].abs()  # a row whose zero point sits at the grid's end
    packed = rtn_quantize(weight, spec, torch.float32)
    return QuantLinear.from_packed(packed, spec, None, torch.float32)


@pytest.mark.parametrize(
    ("bits", "group_size", "symmetric", "k", "block"),
    [
        (4, 32, False, 128, 32),
        (4, 64, True, 576, 64),
        (4, 128, False, 256, 128),
        (4, 96, False, 192, 32),  # one group = three blocks sharing its scale and zero
        (4, PER_CHANNEL, False, 576, 64),  # a 576-wide row = nine blocks
        (8, PER_CHANNEL, True, 576, 64),
        (8, 32, False, 64, 32),
        (8, 256, True, 512, 128),  # blocks stop at 128
    ],
)
def test_the_blocks_dequantize_to_the_layers_weight(bits, group_size, symmetric, k, block):
    layer = quant_linear(13, k, QuantSpec(bits, group_size, symmetric))  # odd N: zero-point rows
    w = to_matmul_nbits(layer, "layer")
    assert w.block_size == block
    assert w.packed.dtype == np.uint8 and w.packed.shape == (13, k // block, block * bits // 8)
    assert w.scales.dtype == np.float32 and w.scales.shape == (13, k // block)
    if symmetric:
        assert w.zero_points is None
    else:
        assert w.zero_points.shape == (13, -(-(k // block) * bits // 8))
    expected = layer.dequantized_weight().numpy()
    np.testing.assert_array_equal(dequantize_nbits(w), expected)


def test_a_wrong_nibble_order_would_be_caught():
    # The check above can fail: swapping the two 4-bit values of every byte changes the weight.
    layer = quant_linear(8, 64, QuantSpec(4, 32, True))
    w = to_matmul_nbits(layer, "layer")
    swapped = (w.packed >> 4) | ((w.packed & 0x0F) << 4)
    wrong = NBitsWeight(swapped, w.scales, None, 4, 32, 64, 8)
    assert not np.array_equal(dequantize_nbits(wrong), layer.dequantized_weight().numpy())


@pytest.mark.parametrize(("group", "block"), [(16, 16), (48, 16), (64, 64), (576, 64), (4096, 128)])
def test_block_size_is_the_largest_power_of_two_dividing_the_group(group, block):
    assert block_size_for(group) == block


@pytest.mark.parametrize("group_size", [8, 40])
def test_group_sizes_matmul_nbits_cannot_express_are_refused_by_name(group_size):
    layer = quant_linear(4, 160, QuantSpec(4, group_size, True))
    with pytest.raises(
        ArtifactError, match=rf"model.layers.0.mlp.up_proj: group size {group_size}"
    ):
        to_matmul_nbits(layer, "model.layers.0.mlp.up_proj")
