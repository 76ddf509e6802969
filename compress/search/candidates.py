"""The formats a Linear layer can take in a searched artifact, and what each costs on disk.

Costs are the exact bytes of the tensors `QuantLinear` stores (compressed-tensors'
`pack-quantized` layout, quant/packing.py), not bits × weights:

    weight_packed      int32 (N, ⌈K·bits/32⌉)
    weight_scale       scale dtype (N, G)                         G = K / group (1 per channel)
    weight_zero_point  int32 (⌈N·bits/32⌉, G), asymmetric only    (packed along N)
    weight_shape       int64 (2,)

and N·K·(bytes of the 16-bit dtype) for a layer kept in 16 bits. A bias costs the same in every
format, so it is left out: costs compare formats, they do not size the file.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from compress.quant.config import PER_CHANNEL, check_group_size, scheme_name

WEIGHT_SHAPE_BYTES = 2 * 8  # int64 (2,)
KEEP = "keep"
_NAME = re.compile(r"int([48])-(channel|g[1-9][0-9]*)-(sym|asym)")


@dataclass(frozen=True)
class Format:
    """One way to store a layer: integers of `bits` in groups of `group_size` (PER_CHANNEL for
    one group per row), or `bits` 16 for the layer kept as it is."""

    bits: int
    group_size: int = PER_CHANNEL
    symmetric: bool = True

    @property
    def name(self) -> str:
        """The quantize stage's scheme name (`int4-g64-asym`, `int8-channel-sym`), or `keep`."""
        if self.bits == 16:
            return KEEP
        return scheme_name(self.bits, self.group_size, self.symmetric)

    @classmethod
    def parse(cls, name: str) -> Format:
        """The format a `name` names; ValueError saying what names look like otherwise."""
        if name == KEEP:
            return KEEP_16
        match = _NAME.fullmatch(name)
        if match is None:
            raise ValueError(
                f"{name!r} is not a format: write `int<4|8>-g<group>-<sym|asym>`, "
                "`int<4|8>-channel-<sym|asym>` or `keep`"
            )
        bits, group, kind = match.groups()
        group_size = PER_CHANNEL if group == "channel" else int(group.removeprefix("g"))
        check_group_size(group_size, int(bits))
        return cls(int(bits), group_size, kind == "sym")


KEEP_16 = Format(bits=16)
DEFAULT_FORMATS = (
    Format(4, 32, False),
    Format(4, 64, False),
    Format(4, 128, False),
    Format(8, PER_CHANNEL, True),
    KEEP_16,
)


def fits(fmt: Format, in_features: int) -> bool:
    """Whether a layer of `in_features` inputs can be stored in `fmt` (groups divide the row,
    codes fill whole int32 words)."""
    if fmt.bits == 16:
        return True
    if (in_features * fmt.bits) % 32:
        return False
    return fmt.group_size == PER_CHANNEL or in_features % fmt.group_size == 0


def storage_bytes(fmt: Format, out_features: int, in_features: int, dtype_bytes: int = 2) -> int:
    """Exact bytes of a (out_features × in_features) weight stored in `fmt`; scales and kept
    weights in a `dtype_bytes` dtype. ValueError when the shape does not take the format."""
    if not fits(fmt, in_features):
        raise ValueError(f"{fmt.name} does not fit in_features={in_features}")
    if fmt.bits == 16:
        return out_features * in_features * dtype_bytes
    groups = 1 if fmt.group_size == PER_CHANNEL else in_features // fmt.group_size
    codes = out_features * math.ceil(in_features * fmt.bits / 32) * 4
    scales = out_features * groups * dtype_bytes
    zeros = 0 if fmt.symmetric else math.ceil(out_features * fmt.bits / 32) * groups * 4
    return codes + scales + zeros + WEIGHT_SHAPE_BYTES


def candidate_formats(
    in_features: int, formats: tuple[Format, ...] = DEFAULT_FORMATS
) -> list[Format]:
    """The formats of `formats` a layer with `in_features` inputs can take, in the given order."""
    return [fmt for fmt in formats if fits(fmt, in_features)]
