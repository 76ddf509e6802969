"""Our integers as GGUF blocks (compress/gguf/blocks.py), read back by the gguf package's own
dequantizer (the reader transformers and llama.cpp's Python tools use), and the `gguf_exact`
scales that make the carried weights bit-exact."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from compress.gguf.blocks import BlockFormat, block_format, encode_blocks, rounding_error
from compress.quant.primitives import (
    PER_CHANNEL,
    QParams,
    QuantSpec,
    choose_qparams,
    dequantize,
    quantize,
    round_up_fp16_exact,
)

SPECS = [
    (QuantSpec(4, 32, False), BlockFormat.Q4_1),
    (QuantSpec(4, 64, False), BlockFormat.Q4_1),
    (QuantSpec(4, 128, True), BlockFormat.Q4_0),
    (QuantSpec(4, PER_CHANNEL, False), BlockFormat.Q4_1),
    (QuantSpec(8, PER_CHANNEL, True), BlockFormat.Q8_0),
    (QuantSpec(8, 64, True), BlockFormat.Q8_0),
]


def _quantized(
    spec: QuantSpec, scale_dtype: torch.dtype, shape=(48, 256), seed=0, smallest: float = 1e-2
):
    generator = torch.Generator().manual_seed(seed)
    # Rows of very different magnitudes (INT8 scales from ~4e-5 up) and ranges shifted by a random
    # fraction per row (zero points across 0..15), so fp16 rounding of m = −s·z shows.
    magnitudes = torch.logspace(np.log10(smallest), 0, shape[0])[:, None]
    shift = torch.rand(shape[0], 1, generator=generator)
    weight = (torch.rand(shape, generator=generator) - shift) * magnitudes
    qparams = choose_qparams(weight, spec, scale_dtype)
    return quantize(weight, qparams, spec), qparams


def _gguf_dequantized(blocks) -> torch.Tensor:
    """What the gguf reader makes of the bytes (float32)."""
    ggml_type = gguf.GGMLQuantizationType[blocks.fmt.value]
    return torch.from_numpy(np.array(gguf.quants.dequantize(blocks.data, ggml_type)))


@pytest.mark.parametrize(("spec", "fmt"), SPECS, ids=lambda x: getattr(x, "value", None) or str(x))
def test_the_reader_gets_our_weights_within_fp16_rounding_of_d_and_m(spec, fmt):
    codes, qparams = _quantized(spec, torch.bfloat16)
    blocks = encode_blocks(codes, qparams.scale, qparams.zero, spec)
    assert blocks.fmt is fmt
    assert blocks.data.shape == (48, 256 // 32 * fmt.bytes_per_block)
    ours = dequantize(codes, qparams, spec, torch.float64)
    theirs = _gguf_dequantized(blocks).double()
    assert theirs.shape == ours.shape
    step = qparams.scale.double().repeat_interleave(spec.group_len(256) // 32 * 32, dim=1)
    measured = ((theirs - ours).abs() / step).max().item()
    error = rounding_error(codes, qparams.scale, qparams.zero, spec)
    # The reported error is the measured one (fp16 products computed in float32 by the reader).
    assert error.max_steps == pytest.approx(measured, abs=1e-6)
    assert error.max_steps <= 15 * 2**-11  # half an fp16 ulp of m = −s·z, |m| ≤ 15 s
    if fmt is not BlockFormat.Q4_1:
        # bf16 scales (8 significant bits) are exact in fp16 down to 2^-16: only m rounds.
        assert error.changed == 0 and measured == 0.0


@pytest.mark.parametrize("spec", [QuantSpec(8, PER_CHANNEL, True), QuantSpec(4, 32, True)])
def test_scales_too_small_for_fp16_are_reported_and_gguf_exact_avoids_them(spec):
    codes, qparams = _quantized(spec, torch.bfloat16, smallest=1e-7)
    error = rounding_error(codes, qparams.scale, qparams.zero, spec)
    assert error.changed > 0 and error.max_steps > 1e-3  # d itself rounds below 2^-16
    exact = QuantSpec(spec.bits, spec.group_size, spec.symmetric, fp16_exact=True)
    codes, qparams = _quantized(exact, torch.bfloat16, smallest=1e-7)
    assert rounding_error(codes, qparams.scale, qparams.zero, exact).changed == 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gguf_exact_scales_carry_every_weight_bit_exact(dtype):
    spec = QuantSpec(4, 64, False, fp16_exact=True)
    codes, qparams = _quantized(spec, dtype)
    blocks = encode_blocks(codes, qparams.scale, qparams.zero, spec)
    error = rounding_error(codes, qparams.scale, qparams.zero, spec)
    assert error.changed == 0 and error.max_steps == 0.0
    assert torch.equal(_gguf_dequantized(blocks), dequantize(codes, qparams, spec, torch.float32))
    # Without the option the same weights do move (so the check above can fail).
    plain = QuantSpec(4, 64, False)
    codes, qparams = _quantized(plain, dtype)
    assert rounding_error(codes, qparams.scale, qparams.zero, plain).changed > 0


def test_round_up_fp16_exact_keeps_the_range_and_makes_s_times_z_exact():
    scale = torch.logspace(-9, 2, 5000, dtype=torch.float32)
    rounded = round_up_fp16_exact(scale)
    assert bool((rounded >= scale).all())  # up: the grid still spans each group's range
    assert bool((rounded <= scale * (1 + 2**-6) + 2**-18).all())
    for z in range(16):
        product = rounded.double() * z
        assert torch.equal(product.to(torch.float16).double(), product), z
    assert torch.equal(rounded.to(torch.bfloat16).float(), rounded)


def test_gguf_exact_is_the_same_scheme_for_the_artifact():
    # It changes how scales are chosen, not the stored scheme: equal specs, one config group.
    assert QuantSpec(4, 64, False, fp16_exact=True) == QuantSpec(4, 64, False)


@pytest.mark.parametrize(
    ("spec", "in_features", "words"),
    [
        (QuantSpec(4, 16, False), 256, "group_size 16"),
        (QuantSpec(8, PER_CHANNEL, False), 256, "asymmetric"),
        (QuantSpec(4, PER_CHANNEL, True), 200, "in_features 200"),
    ],
)
def test_what_gguf_cannot_hold_is_said(spec, in_features, words):
    reason = block_format(spec, in_features)
    assert isinstance(reason, str) and words in reason
    codes = torch.zeros(4, in_features, dtype=torch.int32)
    qparams = QParams(torch.ones(4, spec.num_groups(in_features)), torch.zeros(4, 1))
    with pytest.raises(ValueError, match=words):
        encode_blocks(codes, qparams.scale, qparams.zero.int(), spec)


def test_nibble_order_is_llamas():
    # Weight j in the low nibble of byte j, weight j + 16 in the high nibble.
    spec = QuantSpec(4, 32, True)
    codes = torch.arange(32, dtype=torch.int32).remainder(16)[None]
    blocks = encode_blocks(
        codes, torch.ones(1, 1, dtype=torch.float16), torch.full((1, 1), 8), spec
    )
    quants = blocks.data[0, 2:]
    assert list(quants[:3]) == [0 | (0 << 4), 1 | (1 << 4), 2 | (2 << 4)]
    codes = torch.cat([torch.zeros(16), torch.full((16,), 15)]).int()[None]
    blocks = encode_blocks(
        codes, torch.ones(1, 1, dtype=torch.float16), torch.full((1, 1), 8), spec
    )
    assert set(blocks.data[0, 2:].tolist()) == {0xF0}
