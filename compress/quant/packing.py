"""The one packed layout: unsigned integers, densely packed into int32 words, little-endian.

For `bits` ∈ {4, 8} a word holds `32 // bits` values; value `i` of a row lives in word
`i // (32 // bits)` at bit offset `(i % (32 // bits)) · bits`. Rows are padded with zeros to a
whole number of words.

Tensors of a quantized Linear `(N, K)` with `G` groups (the names compressed-tensors'
`pack-quantized` format uses, and the same bit layout and offset):

    weight_packed      int32 (N, K·bits/32)          packed along K
    weight_scale       float (N, G)                  the model dtype
    weight_zero_point  int32 (ceil(N·bits/32), G)    packed along N; asymmetric only
    weight_shape       int64 (2,)                    (N, K)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SUPPORTED_BITS = (4, 8)


def values_per_word(bits: int) -> int:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"packing supports bits in {SUPPORTED_BITS}, got {bits}")
    return 32 // bits


def _shifts(bits: int, device: torch.device) -> torch.Tensor:
    return torch.arange(0, 32, bits, dtype=torch.int32, device=device)


def pack_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    """(R, C) ints in [0, 2^bits) → (R, ceil(C / per_word)) int32, packed along C."""
    per_word = values_per_word(bits)
    if values.ndim != 2:
        raise ValueError(f"pack_rows expects a 2-D tensor, got shape {tuple(values.shape)}")
    if values.is_floating_point() or values.is_complex() or values.dtype == torch.bool:
        raise ValueError(f"pack_rows expects integer values, got {values.dtype}")
    if values.numel() and (values.min() < 0 or values.max() >= (1 << bits)):
        raise ValueError(f"values out of range for {bits}-bit packing")
    rows, cols = values.shape
    words = math.ceil(cols / per_word)
    padded = torch.zeros(rows, words * per_word, dtype=torch.int32, device=values.device)
    padded[:, :cols] = values.to(torch.int32)
    # (R, W, per_word) << shifts, then OR-reduce; the top value's shift may set the sign bit,
    # which is intended (int32 is only a container).
    shifted = padded.view(rows, words, per_word) << _shifts(bits, values.device)
    packed = shifted[..., 0].clone()
    for i in range(1, per_word):
        packed |= shifted[..., i]
    return packed


def unpack_rows(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """Inverse of `pack_rows`: (R, W) int32 → (R, cols) int32 in [0, 2^bits)."""
    per_word = values_per_word(bits)
    if packed.dtype != torch.int32 or packed.ndim != 2:
        raise ValueError(f"expected a 2-D int32 tensor, got {packed.dtype} {tuple(packed.shape)}")
    if packed.shape[1] * per_word < cols:
        raise ValueError(f"{packed.shape[1]} words hold fewer than {cols} values at {bits} bits")
    mask = (1 << bits) - 1
    values = (packed.unsqueeze(-1) >> _shifts(bits, packed.device)) & mask
    return values.reshape(packed.shape[0], -1)[:, :cols]


def pack_weight(q: torch.Tensor, bits: int) -> torch.Tensor:
    """(N, K) → (N, K·bits/32); K must fill whole words (checked in preflight)."""
    return pack_rows(q, bits)


def unpack_weight(packed: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    return unpack_rows(packed, bits, in_features)


def pack_zero_points(zero: torch.Tensor, bits: int) -> torch.Tensor:
    """(N, G) → (ceil(N·bits/32), G): packed along N, as compressed-tensors stores them."""
    return pack_rows(zero.t(), bits).t().contiguous()


def unpack_zero_points(packed: torch.Tensor, bits: int, out_features: int) -> torch.Tensor:
    return unpack_rows(packed.t().contiguous(), bits, out_features).t().contiguous()


@dataclass(frozen=True)
class PackedWeight:
    """The stored tensors of one quantized Linear (see the module docstring for shapes)."""

    weight_packed: torch.Tensor
    weight_scale: torch.Tensor
    weight_zero_point: torch.Tensor | None  # None when symmetric

    @classmethod
    def from_quantized(
        cls, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, symmetric: bool
    ) -> PackedWeight:
        """Pack unsigned (N, K) integers with their (N, G) scales and zero points."""
        return cls(
            weight_packed=pack_weight(q, bits),
            weight_scale=scale,
            weight_zero_point=None if symmetric else pack_zero_points(zero, bits),
        )
