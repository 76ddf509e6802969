"""Packing of unsigned 4/8-bit integers into int32 words: round trips, bit layout, errors."""

from __future__ import annotations

import math

import pytest
import torch

from compress.quant.packing import (
    PackedWeight,
    pack_rows,
    pack_weight,
    pack_zero_points,
    unpack_rows,
    unpack_weight,
    unpack_zero_points,
    values_per_word,
)

BITS = (4, 8)


def as_int32(word: int) -> int:
    """An unsigned 32-bit pattern as the int32 value torch stores for it."""
    assert 0 <= word < 1 << 32
    return word - (1 << 32) if word >= 1 << 31 else word


def random_values(rows: int, cols: int, bits: int, seed: int = 0) -> torch.Tensor:
    """Uniform over the full range [0, 2^bits), with the max value forced into the top slot of
    every word of row 0 (so the int32 sign bit is set) and 0 and max present everywhere."""
    gen = torch.Generator().manual_seed(seed)
    values = torch.randint(0, 1 << bits, (rows, cols), generator=gen, dtype=torch.int32)
    per_word = 32 // bits
    values[0, per_word - 1 :: per_word] = (1 << bits) - 1
    values[-1, 0] = 0
    values[-1, -1] = (1 << bits) - 1
    return values


@pytest.mark.parametrize("bits", BITS)
def test_values_per_word(bits):
    assert values_per_word(bits) == 32 // bits


@pytest.mark.parametrize("bits", [1, 2, 3, 16, 32])
def test_unsupported_bits_raise(bits):
    with pytest.raises(ValueError, match="bits"):
        values_per_word(bits)
    with pytest.raises(ValueError, match="bits"):
        pack_rows(torch.zeros(2, 8, dtype=torch.int32), bits)
    with pytest.raises(ValueError, match="bits"):
        unpack_rows(torch.zeros(2, 1, dtype=torch.int32), bits, 8)


@pytest.mark.parametrize("cols", [8, 64, 576, 13, 1, 7])
@pytest.mark.parametrize("bits", BITS)
def test_pack_rows_round_trip(bits, cols):
    values = random_values(13, cols, bits)
    packed = pack_rows(values, bits)
    per_word = 32 // bits
    assert packed.dtype == torch.int32
    assert packed.shape == (13, math.ceil(cols / per_word))
    assert torch.equal(unpack_rows(packed, bits, cols), values)


@pytest.mark.parametrize("bits", BITS)
def test_max_value_sets_the_sign_bit_and_survives(bits):
    per_word = 32 // bits
    values = torch.full((3, 2 * per_word), (1 << bits) - 1, dtype=torch.int32)
    packed = pack_rows(values, bits)
    assert (packed == -1).all()  # every bit set: 0xFFFFFFFF
    assert torch.equal(unpack_rows(packed, bits, 2 * per_word), values)
    # Only the top slot at max: the sign bit alone plus the slot's lower bits.
    top_only = torch.zeros(1, per_word, dtype=torch.int32)
    top_only[0, -1] = (1 << bits) - 1
    packed = pack_rows(top_only, bits)
    assert packed.item() == as_int32(((1 << bits) - 1) << (32 - bits))
    assert packed.item() < 0
    assert torch.equal(unpack_rows(packed, bits, per_word), top_only)


@pytest.mark.parametrize("in_features", [64, 256, 576])
@pytest.mark.parametrize("bits", BITS)
def test_weight_round_trip(bits, in_features):
    q = random_values(13, in_features, bits, seed=in_features)
    packed = pack_weight(q, bits)
    assert packed.shape == (13, in_features * bits // 32)
    assert (packed < 0).any()  # the sign bit is in use
    assert torch.equal(unpack_weight(packed, bits, in_features), q)


@pytest.mark.parametrize("groups", [1, 4, 9])
@pytest.mark.parametrize("out_features", [13, 8, 1, 96])
@pytest.mark.parametrize("bits", BITS)
def test_zero_point_round_trip(bits, out_features, groups):
    zero = random_values(groups, out_features, bits, seed=out_features).t().contiguous()
    assert zero.shape == (out_features, groups)
    packed = pack_zero_points(zero, bits)
    assert packed.dtype == torch.int32
    assert packed.shape == (math.ceil(out_features * bits / 32), groups)
    assert packed.is_contiguous()
    assert torch.equal(unpack_zero_points(packed, bits, out_features), zero)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int16, torch.uint8])
def test_other_integer_dtypes_pack_like_int32(dtype):
    values = random_values(5, 24, 4)
    assert torch.equal(pack_rows(values.to(dtype), 4), pack_rows(values, 4))


# --- the documented layout: value i of a row → word i // per_word, bits (i % per_word)·bits ---


def test_layout_4bit_by_hand():
    row = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]], dtype=torch.int32)
    packed = pack_rows(row, 4)
    # Word 0 holds values 0..7, value 0 in the lowest nibble: 0x87654321 (sign bit set).
    # Word 1 holds values 8, 9 and zero padding: 0x000000A9.
    assert packed.tolist() == [[as_int32(0x87654321), 0xA9]]
    assert unpack_rows(packed, 4, 10).tolist() == row.tolist()
    # The padding nibbles unpack as zeros.
    assert unpack_rows(packed, 4, 16).tolist() == [[*row[0].tolist(), 0, 0, 0, 0, 0, 0]]


def test_layout_8bit_by_hand():
    rows = torch.tensor([[0x01, 0x02, 0x03, 0xFF, 0x7F], [0xAB, 0, 0, 0, 0x10]], dtype=torch.int32)
    packed = pack_rows(rows, 8)
    assert packed.tolist() == [[as_int32(0xFF030201), 0x7F], [0xAB, 0x10]]
    assert unpack_rows(packed, 8, 5).tolist() == rows.tolist()


@pytest.mark.parametrize("bits", BITS)
def test_layout_matches_formula(bits):
    """Every value sits at word i // per_word, bit offset (i % per_word) · bits."""
    per_word = 32 // bits
    values = random_values(4, 3 * per_word + 1, bits, seed=7)
    packed = pack_rows(values, bits)
    expected_words = [[0] * packed.shape[1] for _ in range(values.shape[0])]
    for r, row in enumerate(values.tolist()):
        for i, v in enumerate(row):
            expected_words[r][i // per_word] |= v << ((i % per_word) * bits)
    assert packed.tolist() == [[as_int32(w) for w in row] for row in expected_words]


def test_zero_point_layout_packs_along_out_features():
    # (N=10, G=2) zero points at 4 bits: column g of the packed tensor holds the zeros of
    # rows 0..7 of group g in word 0 and rows 8..9 in word 1.
    zero = torch.tensor(
        [[1, 15], [2, 14], [3, 13], [4, 12], [5, 11], [6, 10], [7, 9], [8, 8], [9, 7], [10, 6]],
        dtype=torch.int32,
    )
    packed = pack_zero_points(zero, 4)
    assert packed.tolist() == [
        [as_int32(0x87654321), as_int32(0x89ABCDEF)],
        [0xA9, 0x67],
    ]


# --- PackedWeight ---


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", BITS)
def test_packed_weight_shapes(bits, symmetric):
    n, k, g = 13, 128, 4
    q = random_values(n, k, bits)
    zero = random_values(n, g, bits, seed=1)
    scale = torch.rand(n, g, dtype=torch.bfloat16) + 0.1
    packed = PackedWeight.from_quantized(q, scale, zero, bits, symmetric)
    assert packed.weight_packed.shape == (n, k * bits // 32)
    assert torch.equal(unpack_weight(packed.weight_packed, bits, k), q)
    assert packed.weight_scale is scale
    if symmetric:
        assert packed.weight_zero_point is None
    else:
        assert packed.weight_zero_point.shape == (math.ceil(n * bits / 32), g)
        assert torch.equal(unpack_zero_points(packed.weight_zero_point, bits, n), zero)


# --- errors ---


@pytest.mark.parametrize(("bits", "bad"), [(4, -1), (4, 16), (4, 255), (8, -1), (8, 256)])
def test_out_of_range_values_raise(bits, bad):
    values = torch.zeros(3, 16, dtype=torch.int32)
    values[1, 5] = bad
    with pytest.raises(ValueError, match=f"out of range for {bits}-bit"):
        pack_rows(values, bits)
    with pytest.raises(ValueError, match="out of range"):
        pack_zero_points(values, bits)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int16, torch.uint8, torch.float32])
def test_unpack_wrong_dtype_raises(dtype):
    packed = pack_rows(random_values(2, 16, 4), 4)
    with pytest.raises(ValueError, match=str(dtype)):
        unpack_rows(packed.to(dtype), 4, 16)


@pytest.mark.parametrize(
    "values",
    [torch.full((2, 8), 1.7), torch.full((2, 8), 3.0), torch.ones(2, 8, dtype=torch.bool)],
    ids=["float-fraction", "float-whole", "bool"],
)
def test_pack_non_integer_dtype_raises(values):
    # A float would otherwise be truncated by .to(torch.int32) and packed silently (1.7 → 1).
    with pytest.raises(ValueError, match=str(values.dtype)):
        pack_rows(values, 4)
    with pytest.raises(ValueError, match=str(values.dtype)):
        pack_zero_points(values, 4)


@pytest.mark.parametrize("shape", [(16,), (2, 2, 8)])
def test_wrong_rank_raises(shape):
    with pytest.raises(ValueError, match="2-D"):
        pack_rows(torch.zeros(shape, dtype=torch.int32), 4)
    with pytest.raises(ValueError, match="2-D"):
        unpack_rows(torch.zeros(shape, dtype=torch.int32), 4, 8)


def test_unpack_too_few_words_raises():
    packed = pack_rows(random_values(2, 16, 4), 4)  # 2 words per row = 16 values
    with pytest.raises(ValueError, match="fewer than 17"):
        unpack_rows(packed, 4, 17)
