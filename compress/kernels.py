"""`compress::dequant_matmul`: the one op every quantized Linear calls.

The default implementation is pure PyTorch (unpack → dequantize in the activation dtype →
matmul) and runs on every device. A faster implementation for a device registers against the
same op for its dispatch key (CPU and CUDA below), so callers never choose kernels by
hardware. On CPU, INT4 (groups 32–256) and symmetric INT8
per-channel layers run through torch's packed CPU matmuls up to a few hundred tokens per call,
where those are faster, and dequantize → GEMM above (`_dequant_matmul_cpu`; the named
choice `cpu_kernel("reference")` or COMPRESS_CPU_KERNEL=reference keeps the default path,
whose outputs are bit-identical to dequantize → F.linear). The CUDA kernel calls the
compiled `cuda_ext/` ops (compress/cuda_ops.py), picked by `cuda_path`: a tensor-core GEMM
up to 64 rows, decode shapes included (a GEMV where the tensor cores cannot run), and for more
a dequantize kernel followed by cuBLAS. The fake (meta) implementation lets
`torch.compile` and meta-device tracing see the output shape without running anything.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple

import torch

from compress import cuda_ops
from compress.quant.config import PER_CHANNEL
from compress.quant.packing import unpack_zero_points


def check_dequant_matmul_args(
    x: torch.Tensor,
    weight_packed: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    bits: int,
    group_size: int,
    in_features: int,
) -> None:
    """Shape/dtype checks shared by every implementation; errors name the shapes. Every
    quantized layer runs them on every call, so the message is built only on failure."""

    def fail(problem: str) -> None:
        shapes = (
            f"(x {tuple(x.shape)}, weight_packed {tuple(weight_packed.shape)}, "
            f"scale {tuple(scale.shape)}, zero_point "
            f"{None if zero_point is None else tuple(zero_point.shape)}, bits={bits}, "
            f"group_size={group_size})"
        )
        raise ValueError(f"dequant_matmul: {problem} {shapes}")

    if bits not in (4, 8):
        fail(f"bits must be 4 or 8, got {bits}")
    if in_features <= 0:
        fail(f"in_features must be positive, got {in_features}")
    if weight_packed.dtype != torch.int32 or weight_packed.ndim != 2:
        fail(f"weight_packed must be a 2-D int32 tensor, got {weight_packed.dtype}")
    if x.shape[-1] != in_features:
        fail(f"x has {x.shape[-1]} features, the weight expects K={in_features}")
    if weight_packed.shape[1] * (32 // bits) != in_features:
        fail(f"weight_packed does not hold K={in_features} {bits}-bit values per row")
    if group_size != PER_CHANNEL and (group_size <= 0 or in_features % group_size):
        fail(f"group_size {group_size} is not -1 and does not divide K={in_features}")
    out_features = weight_packed.shape[0]
    groups = 1 if group_size == PER_CHANNEL else in_features // group_size
    if tuple(scale.shape) != (out_features, groups):
        fail(f"scale must be (N={out_features}, G={groups})")
    zp_rows = math.ceil(out_features * bits / 32)
    if zero_point is not None and (
        zero_point.dtype != torch.int32 or tuple(zero_point.shape) != (zp_rows, groups)
    ):
        fail(f"zero_point must be int32 of shape ({zp_rows}, {groups})")


def _unpacked_codes(weight_packed: torch.Tensor, bits: int) -> torch.Tensor:
    """(N, W) int32 → (N, K) uint8 codes, reading the little-endian words as bytes.

    Byte j of a row holds values 2j (low nibble) and 2j + 1 (high nibble) at 4 bits, or value
    j at 8 bits: the same order as `packing.unpack_rows`, at a quarter of its memory traffic.
    """
    as_bytes = weight_packed.view(torch.uint8)
    if bits == 8:
        return as_bytes
    return torch.stack((as_bytes & 0xF, as_bytes >> 4), dim=-1).view(weight_packed.shape[0], -1)


def dequantize_packed(
    weight_packed: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    bits: int,
    group_size: int,
    in_features: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Packed tensors → (N, K) weight of `dtype`: (q - zero) · scale, exact in integers."""
    out_features, groups = scale.shape
    codes = _unpacked_codes(weight_packed, bits).view(out_features, groups, -1)  # (N, G, g)
    if zero_point is None:
        # q - 2^(bits-1) as a signed byte: flip the top bit (8 bits) or subtract (4 bits).
        centered = (codes ^ 0x80) if bits == 8 else codes - (1 << (bits - 1))
        centered = centered.view(torch.int8)
    else:
        zero = unpack_zero_points(zero_point, bits, out_features).unsqueeze(-1)  # (N, G, 1)
        if bits == 8:  # differences span [-255, 255]: int16
            centered = codes.to(torch.int16) - zero.to(torch.int16)
        else:  # differences span [-15, 15]: wrap in uint8, reinterpret as int8
            centered = (codes - zero.to(torch.uint8)).view(torch.int8)
    weight = centered.to(dtype) * scale.to(dtype).unsqueeze(-1)
    return weight.view(out_features, in_features)


# The op is defined with torch.library.Library, not `torch.library.custom_op`: a custom_op call
# passes through two Python layers of its own (autograd, then a device lookup) before ours, 9 µs
# per call against 3.5 µs here (CPU, no_grad; benchmarks/dispatch.py), and every quantized layer
# pays it on every decode step. Each implementation below is registered for its dispatch key
# directly. The op has no autograd formula, so that inference does not pay for an autograd
# layer: QuantLinear supplies the backward through x (compress/quant/linear.py). Called directly
# with an x that requires grad, the op gets torch's autograd fallback, which warns on backward.
_LIBRARY = torch.library.Library("compress", "FRAGMENT")
_LIBRARY.define(
    "dequant_matmul(Tensor x, Tensor weight_packed, Tensor scale, Tensor? zero_point, "
    "int bits, int group_size, int in_features) -> Tensor"
)
# y = x @ dequantize(W)ᵀ for x (..., K) → (..., N), computed in x's dtype.
dequant_matmul = torch.ops.compress.dequant_matmul.default


def _dequant_matmul_default(
    x: torch.Tensor,
    weight_packed: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    bits: int,
    group_size: int,
    in_features: int,
) -> torch.Tensor:
    """Every device without an implementation of its own: dequantize, then F.linear."""
    check_dequant_matmul_args(x, weight_packed, scale, zero_point, bits, group_size, in_features)
    return _dequantize_then_linear(
        x, weight_packed, scale, zero_point, bits, group_size, in_features
    )


_LIBRARY.impl("dequant_matmul", _dequant_matmul_default, "CompositeExplicitAutograd")


def _dequantize_then_linear(
    x: torch.Tensor,
    weight_packed: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    bits: int,
    group_size: int,
    in_features: int,
) -> torch.Tensor:
    """The pure-PyTorch computation (arguments already checked)."""
    weight = dequantize_packed(
        weight_packed, scale, zero_point, bits, group_size, in_features, x.dtype
    )
    return torch.nn.functional.linear(x, weight)


@torch.library.register_fake("compress::dequant_matmul", lib=_LIBRARY)
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


# ------------------------------------------- operands prepared once, kept with the weight


class _CachedOperands(NamedTuple):
    key: tuple
    value: Any
    # The tensors the value was made from besides the weight, kept alive with it (_cached_on).
    held: tuple[torch.Tensor | None, ...]


def _cached_on(
    tensor: torch.Tensor,
    key: tuple,
    make: Callable[[], Any],
    held: tuple[torch.Tensor | None, ...] = (),
) -> Any:
    """`make()` once per `key`, kept on `tensor` itself: the operands live and die with the
    weight they were made from.

    `key` holds the tensors' states (`_state`), so an in-place change (load_state_dict,
    copy_), a swapped `.data`, or another tensor or a view in their place remakes the
    operands. The `held` tensors (scales, zero points) are kept referenced while the cache
    holds operands made from them, so no new tensor can take their id or memory and pass for
    them. `tensor` itself is not held (its own cache would keep it alive) and need not be:
    the cache is on it."""
    cached = getattr(tensor, "_compress_operands", None)
    if cached is not None and cached.key == key:
        return cached.value
    value = make()
    tensor._compress_operands = _CachedOperands(key, value, held)  # type: ignore[attr-defined]
    return value


def _state(tensor: torch.Tensor | None) -> tuple[int, int, int] | None:
    """Which tensor, its memory and its in-place-change counter. A view is another tensor
    (same memory and counter, another shape); assigning to `.data` moves the memory without
    counting. Tensors made under inference_mode have no counter (and are not expected to
    change in place): -1. The id is safe in a key only while the tensor is alive: the cache
    holds the tensors it keys on (`_cached_on`)."""
    if tensor is None:
        return None
    return id(tensor), tensor.data_ptr(), -1 if tensor.is_inference() else tensor._version


def _checked_operands(
    args: tuple, key: tuple, make: Callable[[], Any], held: tuple[torch.Tensor | None, ...]
) -> Any:
    """The weight's cached operands (`_cached_on`) for the op's arguments `args`, with the op's
    checks: all of them when the operands are made, which hold for the weight for as long as
    the key does (it holds the tensors' states and the layout), and x's on every call. Every
    quantized layer calls this on every decode step: the checks cost about a microsecond."""
    x, weight_packed, _, _, bits, group_size, in_features = args

    def checked_make() -> Any:
        check_dequant_matmul_args(*args)
        return make()

    layout_key = (*key, bits, group_size, in_features)
    value = _cached_on(weight_packed, layout_key, checked_make, held)
    if x.shape[-1] != in_features:
        check_dequant_matmul_args(*args)  # raises, naming the shapes
    return value


# ------------------------------------------------------------------------------------ CUDA

# Which cuda_ext kernel takes how many rows (M). The tensor-core GEMM takes 1…CUDA_MMA_MAX_ROWS
# where it can run (K and the group size multiples of its slice, 16-byte aligned rows; every
# device the kernels run on is sm_80+, see cuda_operands); where it cannot, the GEMV takes up
# to CUDA_GEMV_MAX_ROWS; above either, the weight is dequantized once by the CUDA kernel and
# multiplied by cuBLAS. The GEMV would also take M ≤ CUDA_GEMV_ROWS where the tensor cores can
# run: 0, because for the same bytes read the tensor-core kernel issues 1.9–3.3 instructions
# per INT4 weight at M ≤ 8 and the GEMV 8.3 (sm_90 machine code, benchmarks/kernel_sass.py).
# Unmeasured on a GPU: benchmarks/kernel.py times both kernels at every M, to confirm or move
# this.
CUDA_GEMV_ROWS = 0
CUDA_GEMV_MAX_ROWS = 16
CUDA_MMA_MAX_ROWS = 64


def mma_slice(bits: int) -> int:
    """K covered by one thread's 16 bytes of codes in the tensor-core GEMM."""
    return 4 * (32 // bits)


def mma_takes_shape(bits: int, group_size: int, in_features: int) -> bool:
    """Whether the tensor-core GEMM can read the weight: K and the group whole slices (the
    rule of mma_takes_shape in cuda_ext/dequant_matmul_kernels.cuh, which the op checks)."""
    group_len = in_features if group_size == PER_CHANNEL else group_size
    slice_k = mma_slice(bits)
    return in_features % slice_k == 0 and group_len % slice_k == 0


def cuda_path(rows: int, bits: int, group_size: int, in_features: int, *, mma_capable: bool) -> str:
    """The cuda_ext kernel for `rows` activation rows: "gemv", "mma" or "dequantize"."""
    mma = mma_capable and mma_takes_shape(bits, group_size, in_features)
    if 0 < rows <= CUDA_GEMV_ROWS or (0 < rows <= CUDA_GEMV_MAX_ROWS and not mma):
        return "gemv"
    if mma and 0 < rows <= CUDA_MMA_MAX_ROWS:
        return "mma"
    return "dequantize"


CUDA_DTYPES = (torch.float16, torch.bfloat16)


def cuda_operands(
    weight_packed: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor | None, bool] | None:
    """(scales in `dtype`, zero points, whether the tensor cores can read the codes), as the
    kernels take them, or None where the loaded kernels hold no code the weight's device runs
    (cuda_ops.runs_on: before sm_80; the op then takes its pure-PyTorch path). Scales are cast
    to the activation dtype, the rounding the pure-PyTorch path applies too. The codes are not
    kept here: a tensor's cache holding the tensor itself would be a reference cycle. A
    non-contiguous weight is copied on each call, and a new allocation is 16-byte aligned, so
    the alignment judged on the copy made here holds. Every device the kernels run on is
    sm_80 or newer (compress/cuda_build.py), so the tensor cores need only the alignment."""
    if not cuda_ops.runs_on(weight_packed.device):
        return None
    aligned = weight_packed.contiguous().data_ptr() % 16 == 0
    zero = None if zero_point is None else zero_point.contiguous()
    return scale.to(dtype).contiguous(), zero, aligned


def _dequant_matmul_cuda(
    x: torch.Tensor,
    weight_packed: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    bits: int,
    group_size: int,
    in_features: int,
) -> torch.Tensor:
    """cuda_ext's kernels for FP16/BF16 activations; anything else takes the default path.

    Every decode step calls this once per quantized layer, so the work that depends only on
    the weight (casts, contiguity, alignment) is done once and kept with it."""
    args = (x, weight_packed, scale, zero_point, bits, group_size, in_features)
    if x.dtype not in CUDA_DTYPES or not cuda_ops.load():
        check_dequant_matmul_args(*args)
        return _dequantize_then_linear(*args)

    key = (_state(weight_packed), _state(scale), _state(zero_point), x.dtype)
    operands = _checked_operands(
        args,
        key,
        lambda: cuda_operands(weight_packed, scale, zero_point, x.dtype),
        held=(scale, zero_point),
    )
    if operands is None:  # no kernel code for this device
        return _dequantize_then_linear(*args)
    scale_x, zero, mma_capable = operands
    packed = weight_packed.contiguous()
    ops = torch.ops.compress_cuda
    # The compiled ops take x (..., K) as it is and flatten it themselves: a reshape here
    # would cost about a microsecond each way.
    rows = x.numel() // in_features
    path = cuda_path(rows, bits, group_size, in_features, mma_capable=mma_capable)
    if path == "gemv":
        return ops.gemv.default(x, packed, scale_x, zero, bits, group_size, in_features)
    if path == "mma":
        return ops.mma_gemm.default(x, packed, scale_x, zero, bits, group_size, in_features)
    weight = ops.dequantize.default(packed, scale_x, zero, bits, group_size, in_features)
    return torch.nn.functional.linear(x, weight)


_LIBRARY.impl("dequant_matmul", _dequant_matmul_cuda, "CUDA")


# ------------------------------------------------------------------------------------- CPU

CPU_KERNELS = ("packed", "reference")
_cpu_kernel = os.environ.get("COMPRESS_CPU_KERNEL", "packed")
if _cpu_kernel not in CPU_KERNELS:
    raise ValueError(f"COMPRESS_CPU_KERNEL={_cpu_kernel!r}: expected one of {CPU_KERNELS}")


@contextmanager
def cpu_kernel(name: str) -> Iterator[None]:
    """Run the block with the named CPU implementation: "packed" (torch's packed matmuls
    where they apply, the default) or "reference" (dequantize → linear everywhere)."""
    global _cpu_kernel
    if name not in CPU_KERNELS:
        raise ValueError(f"cpu_kernel {name!r}: expected one of {CPU_KERNELS}")
    previous, _cpu_kernel = _cpu_kernel, name
    try:
        yield
    finally:
        _cpu_kernel = previous


# Rows (tokens per call) up to which torch's packed CPU matmuls beat dequantize → linear; above,
# the weight is dequantized once per call and multiplied by the dense GEMM, which is at least as
# fast from here on and near the dense layer's own speed (prefill and scoring: lm-eval's
# loglikelihood requests are prefill). Measured per bit width on the demo model's shapes
# (benchmarks/cpu_matmul.py --rows, AVX-512 EPYC, 2 threads, bf16): at 512 rows the packed INT4
# path takes 2.0× the dense bf16 time and dequantize → linear 1.09×.
CPU_PACKED_MAX_ROWS = {4: 128, 8: 64}
# Rows up to which the packed kernels still beat a dense GEMM on an already dequantized weight
# (benchmarks/cpu_matmul.py: at 8 rows they tie with dense bf16, at 32 dense is 1.4× faster).
SCORING_PACKED_MAX_ROWS = 8
# Weights holding a dense copy while `dense_weights_for_scoring` is active (None: inactive).
_scoring: list[torch.Tensor] | None = None


@contextmanager
def dense_weights_for_scoring() -> Iterator[None]:
    """Scoring runs many prefill calls over one model (held-out windows, lm-eval's
    loglikelihood requests). Inside this block, a quantized weight that takes the dequantize →
    GEMM path keeps its dequantized copy after the first call instead of dequantizing it on
    every call: the dense GEMM alone, as fast as the baseline's, with outputs bit-identical to
    dequantize → linear, for the memory of the 16-bit weights (what the baseline held). The
    copies are dropped on exit."""
    global _scoring
    previous, _scoring = _scoring, []
    try:
        yield
    finally:
        for tensor in _scoring:
            with contextlib.suppress(AttributeError):
                del tensor._compress_dense
        _scoring = previous


def _dense_weight(args: tuple) -> torch.Tensor:
    """The dequantized weight for the op's `args`, kept on the packed weight while scoring."""
    x, weight_packed, scale, zero_point, bits, group_size, in_features = args
    key = (_state(weight_packed), _state(scale), _state(zero_point), x.dtype)
    cached = getattr(weight_packed, "_compress_dense", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    weight = dequantize_packed(
        weight_packed, scale, zero_point, bits, group_size, in_features, x.dtype
    )
    # The scale and zero point are held so no other tensor can take their ids (see _cached_on).
    weight_packed._compress_dense = (key, weight, scale, zero_point)  # type: ignore[attr-defined]
    assert _scoring is not None
    _scoring.append(weight_packed)
    return weight


# Group sizes torch's int4 CPU matmul takes, and the multiple its repacking needs of N.
CPU_INT4_GROUPS = (32, 64, 128, 256)
CPU_INT4_ROWS_MULTIPLE = 16
CPU_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def cpu_int4_operands(
    weight_packed: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(torch's int4 CPU layout of the codes, scales-and-zeros (G, N, 2) in `dtype`).

    torch computes (q − 8)·s + z per element, ours is (q − zero)·s, so z = (8 − zero)·s; with
    no zero point (symmetric) zero = 8 and z = 0."""
    out_features = weight_packed.shape[0]
    codes = _unpacked_codes(weight_packed, 4).to(torch.int32)  # (N, K) in 0..15
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 2)
    scale32 = scale.float()
    if zero_point is None:
        zero = torch.full_like(scale32, 8.0)
    else:
        zero = unpack_zero_points(zero_point, 4, out_features).float()
    scales_and_zeros = torch.stack((scale32, (8 - zero) * scale32), dim=-1)  # (N, G, 2)
    return packed, scales_and_zeros.transpose(0, 1).contiguous().to(dtype)


def cpu_int8_operands(
    weight_packed: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """(signed int8 codes (N, K), per-row scales (N,) in `dtype`) for symmetric INT8: our
    stored code q means q − 128, which flipping the top bit of the byte gives."""
    codes = (weight_packed.view(torch.uint8) ^ 0x80).view(torch.int8)
    return codes.view(weight_packed.shape[0], -1), scale.reshape(-1).to(dtype)


def _dequant_matmul_cpu(
    x: torch.Tensor,
    weight_packed: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    bits: int,
    group_size: int,
    in_features: int,
) -> torch.Tensor:
    """torch's packed CPU matmuls where they apply and are the faster (up to
    `CPU_PACKED_MAX_ROWS` rows; the weight is repacked on first use and kept with it), the
    default path elsewhere. Same result as the default within the activation dtype's rounding
    (tests/kernels/test_dequant_matmul_cpu.py)."""
    args = (x, weight_packed, scale, zero_point, bits, group_size, in_features)
    states = (_state(weight_packed), _state(scale), x.dtype)
    rows = x.numel() // in_features if in_features > 0 else 0
    # While scoring, a kept dense copy beats the packed kernels from a few rows on.
    limit = SCORING_PACKED_MAX_ROWS if _scoring is not None else CPU_PACKED_MAX_ROWS.get(bits, 0)
    packed_ok = _cpu_kernel == "packed" and x.dtype in CPU_DTYPES and 0 < rows <= limit
    int4_ok = (
        group_size in CPU_INT4_GROUPS
        and weight_packed.ndim == 2
        and weight_packed.shape[0] % CPU_INT4_ROWS_MULTIPLE == 0
    )
    if packed_ok and bits == 4 and int4_ok:
        packed, scales_and_zeros = _checked_operands(
            args,
            (*states, _state(zero_point)),
            lambda: cpu_int4_operands(weight_packed, scale, zero_point, x.dtype),
            held=(scale, zero_point),
        )
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(
            x.reshape(-1, in_features).contiguous(), packed, group_size, scales_and_zeros
        )
    elif packed_ok and bits == 8 and zero_point is None and group_size == PER_CHANNEL:
        codes, scales = _checked_operands(
            args,
            states,
            lambda: cpu_int8_operands(weight_packed, scale, x.dtype),
            held=(scale,),
        )
        out = torch.ops.aten._weight_int8pack_mm(
            x.reshape(-1, in_features).contiguous(), codes, scales
        )
    else:
        check_dequant_matmul_args(*args)
        if _scoring is not None and _cpu_kernel == "packed":
            return torch.nn.functional.linear(x, _dense_weight(args))
        return _dequantize_then_linear(*args)
    return out.reshape(*x.shape[:-1], weight_packed.shape[0])


_LIBRARY.impl("dequant_matmul", _dequant_matmul_cpu, "CPU")
