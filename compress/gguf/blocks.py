"""Our stored integers as GGUF's blocks of 32 (pure functions; no file or model access).

llama.cpp's block formats, along the input dimension (K), 32 weights per block:

    Q4_0   fp16 d, 16 bytes of nibbles           w = d · (q − 8)
    Q4_1   fp16 d, fp16 m, 16 bytes of nibbles   w = d · q + m
    Q8_0   fp16 d, 32 int8                       w = d · q

Nibbles: weight j of a block in the low nibble of byte j, weight j + 16 in its high nibble.

Ours (quant/primitives.py): `w = s · (q − z)` with unsigned codes, a scale `s` and a zero
point `z` per group of `g` weights (g = K per channel). So an asymmetric INT4 group becomes
Q4_1 with d = s and m = −s·z; a symmetric INT4 group (z = 8, the packed offset) is Q4_0 with
d = s; a symmetric INT8 group (z = 128) is Q8_0 with d = s and the signed code q − 128. A group
of 64 or 128 is 2 or 4 blocks repeating its s (and z), per channel K/32 blocks. The codes are
carried unchanged; only d and m are rounded, to fp16. `rounding_error` says by how much that
moves each dequantized weight, in units of the group's step s (zero when the quantize stage ran
with `gguf_exact`, which keeps s and s·z exact in fp16).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import numpy as np
import torch

from compress.quant.primitives import QuantSpec

BLOCK = 32  # weights per GGUF block, for every format written here


class BlockFormat(Enum):
    Q4_0 = "Q4_0"
    Q4_1 = "Q4_1"
    Q8_0 = "Q8_0"

    @property
    def bytes_per_block(self) -> int:
        return {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}[self.value]


def block_format(spec: QuantSpec, in_features: int) -> BlockFormat | str:
    """The GGUF format that holds `spec` exactly, or why none does (a sentence)."""
    group = spec.group_len(in_features)
    if in_features % BLOCK:
        return f"in_features {in_features} is not a multiple of GGUF's block of {BLOCK}"
    if group % BLOCK:
        return (
            f"group_size {spec.group_size} is not a multiple of GGUF's block of {BLOCK} "
            "(a GGUF block holds one scale for 32 weights)"
        )
    if spec.bits == 4:
        return BlockFormat.Q4_0 if spec.symmetric else BlockFormat.Q4_1
    if spec.bits == 8 and spec.symmetric:
        return BlockFormat.Q8_0
    return (
        f"INT{spec.bits} {'symmetric' if spec.symmetric else 'asymmetric'} has no GGUF weight "
        "format (Q8_0 is symmetric: quantize INT8 with symmetric: true)"
    )


@dataclass(frozen=True)
class BlockTensor:
    """One weight in GGUF blocks: `data` is (N, K/32 · bytes_per_block) uint8, row-major."""

    fmt: BlockFormat
    data: np.ndarray
    shape: tuple[int, int]  # (N, K) as our Linear holds it; GGUF lists it reversed


@dataclass(frozen=True)
class RoundingError:
    """How far fp16 d and m move the dequantized weights, in units of each group's step s."""

    max_steps: float
    mean_steps: float
    changed: int  # weights whose value differs at all
    count: int


def _per_block(values: torch.Tensor, group: int) -> torch.Tensor:
    """(N, G) per group → (N, K/32) per block: each group's value repeated over its blocks."""
    return values.repeat_interleave(group // BLOCK, dim=1)


def _nibbles(codes: torch.Tensor) -> torch.Tensor:
    """(N, B, 32) codes in [0, 16) → (N, B, 16) bytes: j low, j + 16 high."""
    return (codes[..., :16] | (codes[..., 16:] << 4)).to(torch.uint8)


def _fp16_bytes(values: torch.Tensor) -> torch.Tensor:
    """(N, B) float → (N, B, 2) little-endian fp16 bytes."""
    halves = values.to(torch.float16).contiguous()
    return halves.view(torch.uint8).reshape(*values.shape, 2)


def block_params(
    scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec, in_features: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(d, m) per block in float32 before fp16 rounding: d = s, m = −s·z (Q4_1 only, else None).

    s·z is computed in float64: exact for any float32 s and z < 2^bits.
    """
    group = spec.group_len(in_features)
    d = _per_block(scale.to(torch.float32), group)
    if block_format(spec, in_features) is not BlockFormat.Q4_1:
        return d, None
    m = -(scale.to(torch.float64) * zero.to(torch.float64))
    return d, _per_block(m, group)


def encode_blocks(
    codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec
) -> BlockTensor:
    """(N, K) unsigned codes with (N, G) scales and zero points → GGUF blocks.

    The caller has checked `block_format` (a sentence there is an error here)."""
    n, k = codes.shape
    fmt = block_format(spec, k)
    if not isinstance(fmt, BlockFormat):
        raise ValueError(fmt)
    d, m = block_params(scale, zero, spec, k)
    blocks = codes.to(torch.int32).reshape(n, k // BLOCK, BLOCK)
    if fmt is BlockFormat.Q8_0:
        quants = (blocks - spec.mid).to(torch.int8).view(torch.uint8)
        parts = [_fp16_bytes(d), quants]
    elif fmt is BlockFormat.Q4_0:
        parts = [_fp16_bytes(d), _nibbles(blocks)]
    else:
        assert m is not None
        parts = [_fp16_bytes(d), _fp16_bytes(m), _nibbles(blocks)]
    data = torch.cat(parts, dim=-1).reshape(n, -1)
    return BlockTensor(fmt=fmt, data=data.numpy(), shape=(n, k))


def rounding_error(
    codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec
) -> RoundingError:
    """|ours − GGUF's| per weight in float64, divided by the group's step s.

    Ours is (q − z)·s with s as stored; GGUF's is d·q + m (Q4_1) or d·(q − z) with d and m
    rounded to fp16, exactly as llama.cpp and the gguf reader dequantize it."""
    n, k = codes.shape
    group = spec.group_len(k)
    d, m = block_params(scale, zero, spec, k)
    q = codes.to(torch.float64).reshape(n, k // BLOCK, BLOCK)
    s = _per_block(scale.to(torch.float64), group).unsqueeze(-1)
    z = _per_block(zero.to(torch.float64), group).unsqueeze(-1)
    ours = (q - z) * s
    d16 = d.to(torch.float16).to(torch.float64).unsqueeze(-1)
    if m is None:
        theirs = d16 * (q - z)
    else:
        theirs = d16 * q + m.to(torch.float16).to(torch.float64).unsqueeze(-1)
    # A zero step (an all-zero group) has no error to scale: count it as exact.
    steps = ((ours - theirs).abs() / s.clamp_min(torch.finfo(torch.float64).tiny)).flatten()
    return RoundingError(
        max_steps=float(steps.max()) if steps.numel() else 0.0,
        mean_steps=float(steps.mean()) if steps.numel() else 0.0,
        changed=int((ours != theirs).sum()),
        count=int(steps.numel()),
    )
