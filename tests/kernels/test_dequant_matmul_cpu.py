"""`torch.ops.compress.dequant_matmul` on CPU against a float64 reference, its argument checks,
its fake (meta) implementation, and the QuantLinear module built on it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

from compress.kernels import (
    CPU_PACKED_MAX_ROWS,
    cpu_int4_operands,
    cpu_kernel,
    dense_weights_for_scoring,
)
from compress.quant.config import PER_CHANNEL
from compress.quant.linear import QuantLinear
from compress.quant.packing import PackedWeight
from compress.quant.primitives import QuantSpec, choose_qparams, dequantize, quantize
from compress.quant.rtn import rtn_quantize
from tests.kernels.cases import same_version

OP = torch.ops.compress.dequant_matmul
N = 96

# Relative error of the whole output (Frobenius norm) against the float64 reference.
# float32: the weight dequantizes exactly ((q - z) has ≤ 9 bits, the scale 24) and only the
# matmul's float32 accumulation rounds: ~sqrt(K)·2^-24 ≈ 1.5e-6 at K=576 for random data, so
# 1e-5 leaves ~7x margin while any wrong code, zero point or scale (errors of ≥ one step ~ 1e-2
# relative) fails by orders of magnitude.
# bfloat16: the op dequantizes in x's dtype, so each weight is rounded to 8 significant bits
# (2^-9 relative) and so is every output (2^-9); together ≈ 3e-3 RMS, hence 1e-2.
REL_TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}

# (K, group_size): 576 is the demo model's hidden size, which 128 does not divide.
SHAPES = [(256, PER_CHANNEL), (256, 32), (256, 128), (576, PER_CHANNEL), (576, 32), (576, 64)]
X_LEADING = [(1,), (3,), (16,), (2, 5)]


def make_case(k: int, spec: QuantSpec, dtype: torch.dtype, seed: int = 0):
    """Random weight → (PackedWeight, float64 dequantized weight, bias)."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(N, k, generator=gen) * 0.05
    weight[3, 7] = 1.5  # an outlier
    weight[4] = weight[4].abs()  # an all-positive row
    qparams = choose_qparams(weight, spec, dtype)
    q = quantize(weight, qparams, spec)
    packed = PackedWeight.from_quantized(q, qparams.scale, qparams.zero, spec.bits, spec.symmetric)
    reference = dequantize(q, qparams, spec, dtype=torch.float64)
    bias = torch.randn(N, generator=gen).to(dtype)
    return packed, reference, bias


def op_args(x: torch.Tensor, packed: PackedWeight, spec: QuantSpec, k: int) -> tuple:
    return (
        x,
        packed.weight_packed,
        packed.weight_scale,
        packed.weight_zero_point,
        spec.bits,
        spec.group_size,
        k,
    )


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.to(torch.float64) - ref).norm() / ref.norm()).item()


QUANT_CASES = [
    pytest.param(bits, sym, k, gs, id=f"int{bits}-{'sym' if sym else 'asym'}-K{k}-g{gs}")
    for bits in (4, 8)
    for sym in (True, False)
    for k, gs in SHAPES
]


def check_against_reference(bits, symmetric, k, group_size, dtype, leading):
    spec = QuantSpec(bits, group_size, symmetric)
    packed, w_ref, _ = make_case(k, spec, dtype, seed=k + bits)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(*leading, k, generator=gen).to(dtype)
    y = OP(*op_args(x, packed, spec, k))
    assert y.shape == (*leading, N)
    assert y.dtype == dtype
    ref = x.to(torch.float64) @ w_ref.T
    err = rel_err(y, ref)
    assert err <= REL_TOL[dtype], f"relative error {err:.3g} > {REL_TOL[dtype]}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(("bits", "symmetric", "k", "group_size"), QUANT_CASES)
def test_matches_float64_reference(bits, symmetric, k, group_size, dtype):
    # Every quantization layout × dtype; the x shape cycles through M=1, 3, 16 and (2, 5) so
    # each layout meets several (the full cross product adds time, not coverage).
    leading = X_LEADING[(bits + 3 * symmetric + k // 32 + group_size) % len(X_LEADING)]
    check_against_reference(bits, symmetric, k, group_size, dtype, leading)


@pytest.mark.parametrize("leading", X_LEADING, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    ("bits", "symmetric", "k", "group_size"), [(4, False, 576, 64), (8, True, 256, PER_CHANNEL)]
)
def test_matches_float64_reference_for_every_x_shape(
    bits, symmetric, k, group_size, dtype, leading
):
    check_against_reference(bits, symmetric, k, group_size, dtype, leading)


@pytest.mark.parametrize("out_features", [300, 8])
def test_int4_rows_torch_cannot_repack_take_the_default_path(out_features):
    # torch's int4 CPU repacking needs N divisible by 16 (a 300-token vocabulary's lm_head is
    # not): such layers must still compute, through dequantize → linear.
    spec = QuantSpec(4, 32, False)
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(out_features, 64, generator=gen)
    packed = rtn_quantize(weight, spec, torch.float32)
    x = torch.randn(3, 64, generator=gen)
    y = OP(*op_args(x, packed, spec, 64))
    with cpu_kernel("reference"):
        expected = OP(*op_args(x, packed, spec, 64))
    assert torch.equal(y, expected)


@pytest.mark.parametrize("bits", [4, 8])
def test_many_rows_take_dequantize_then_gemm(bits):
    """Prefill-sized calls (more rows than CPU_PACKED_MAX_ROWS) dequantize once and run the
    dense GEMM, the faster there; few rows take torch's packed kernel (its operands cached on
    the weight)."""
    spec = QuantSpec(bits, 32 if bits == 4 else -1, bits == 8)
    gen = torch.Generator().manual_seed(0)
    packed = rtn_quantize(torch.randn(64, 64, generator=gen), spec, torch.bfloat16)
    many = torch.randn(CPU_PACKED_MAX_ROWS[bits] + 1, 64, generator=gen).to(torch.bfloat16)
    y = OP(*op_args(many, packed, spec, 64))
    with cpu_kernel("reference"):
        assert torch.equal(y, OP(*op_args(many, packed, spec, 64)))
    assert not hasattr(packed.weight_packed, "_compress_operands")
    OP(*op_args(many[:2], packed, spec, 64))
    assert hasattr(packed.weight_packed, "_compress_operands")


def test_scoring_keeps_dense_copies_bit_identical_and_drops_them_after():
    spec = QuantSpec(4, 32, False)
    gen = torch.Generator().manual_seed(0)
    packed = rtn_quantize(torch.randn(64, 64, generator=gen), spec, torch.bfloat16)
    many = torch.randn(CPU_PACKED_MAX_ROWS[4] + 1, 64, generator=gen).to(torch.bfloat16)
    with cpu_kernel("reference"):
        expected = OP(*op_args(many, packed, spec, 64))
    with dense_weights_for_scoring():
        first = OP(*op_args(many, packed, spec, 64))
        copy = packed.weight_packed._compress_dense[1]
        second = OP(*op_args(many, packed, spec, 64))
        assert packed.weight_packed._compress_dense[1] is copy  # made once, reused
    assert torch.equal(first, expected) and torch.equal(second, expected)
    assert not hasattr(packed.weight_packed, "_compress_dense")  # memory given back


def test_reference_check_catches_a_wrong_zero_point():
    """The tolerance above is tight enough to see a one-step error in the zero points."""
    spec = QuantSpec(4, 64, symmetric=False)
    packed, w_ref, _ = make_case(576, spec, torch.bfloat16)
    x = torch.randn(3, 576, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    wrong = PackedWeight(
        packed.weight_packed,
        packed.weight_scale,
        packed.weight_zero_point ^ 0x11111111,  # flips the low bit of every zero point
    )
    err = rel_err(OP(*op_args(x, wrong, spec, 576)), x.to(torch.float64) @ w_ref.T)
    assert err > REL_TOL[torch.bfloat16]


# --- argument checks (same in the real and the fake implementation) ---


def _valid():
    spec = QuantSpec(4, 32, symmetric=False)
    packed, _, _ = make_case(256, spec, torch.float32)
    x = torch.randn(3, 256)
    return op_args(x, packed, spec, 256)


def _wrong_k(args):
    return (
        torch.randn(3, 255),
        *args[1:],
    ), r"x has 255 features, the weight expects K=256 \(x \(3, 255\), weight_packed \(96, 32\)"


def _group_not_dividing(args):
    x, wp, _, zp, bits, _, k = args
    message = r"group_size 48 is not -1 and does not divide K=256"
    return (x, wp, torch.ones(N, 5), zp, bits, 48, k), message


def _scale_shape(args):
    x, wp, scale, zp, bits, gs, k = args
    bad = torch.ones(N, 9, dtype=scale.dtype)
    return (x, wp, bad, zp, bits, gs, k), r"scale must be \(N=96, G=8\) .*scale \(96, 9\)"


def _scale_rows(args):
    x, wp, scale, zp, bits, gs, k = args
    return (x, wp, scale[:50], zp, bits, gs, k), r"scale must be \(N=96, G=8\) .*scale \(50, 8\)"


def _packed_dtype(args):
    x, wp, *rest = args
    message = r"weight_packed must be a 2-D int32 tensor, got torch\.int64"
    return (x, wp.to(torch.int64), *rest), message


def _packed_width(args):
    x, wp, *rest = args
    message = r"does not hold K=256 4-bit values per row .*weight_packed \(96, 16\)"
    return (x, wp[:, :16], *rest), message


def _zero_groups(args):
    x, wp, scale, zp, bits, gs, k = args
    message = r"zero_point must be int32 of shape \(12, 8\) .*zero_point \(12, 3\)"
    return (x, wp, scale, zp[:, :3], bits, gs, k), message


def _zero_rows(args):
    x, wp, scale, zp, bits, gs, k = args
    doubled = torch.cat([zp, zp])
    return (x, wp, scale, doubled, bits, gs, k), r"zero_point must be .*zero_point \(24, 8\)"


def _group_zero(args):
    x, wp, _, zp, bits, _, k = args
    return (x, wp, torch.ones(N, 1), zp, bits, 0, k), r"group_size 0 is not -1"


BAD_ARGS = [
    _zero_rows,
    _group_zero,
    _wrong_k,
    _group_not_dividing,
    _scale_shape,
    _scale_rows,
    _packed_dtype,
    _packed_width,
    _zero_groups,
]


@pytest.mark.parametrize("make_bad", BAD_ARGS, ids=lambda f: f.__name__.lstrip("_"))
def test_bad_arguments_raise_value_error_naming_shapes(make_bad):
    args, message = make_bad(_valid())
    with pytest.raises(ValueError, match=message):
        OP(*args)


@pytest.mark.parametrize("make_bad", BAD_ARGS, ids=lambda f: f.__name__.lstrip("_"))
def test_bad_arguments_raise_after_the_weight_operands_are_cached(make_bad):
    """The weight's checks run when its packed operands are made and x's on every call: a
    bad argument after a good call (operands cached) is still refused, naming the shapes."""
    good = _valid()
    OP(*good)
    assert getattr(good[1], "_compress_operands", None) is not None
    args, message = make_bad(good)
    with pytest.raises(ValueError, match=message):
        OP(*args)


@pytest.mark.parametrize("make_bad", BAD_ARGS, ids=lambda f: f.__name__.lstrip("_"))
def test_fake_implementation_runs_the_same_checks(make_bad):
    args, message = make_bad(_valid())
    with FakeTensorMode() as mode:
        fake_args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        with pytest.raises(ValueError, match=message):
            OP(*fake_args)


def test_valid_arguments_pass_the_checks():
    args = _valid()
    assert OP(*args).shape == (3, N)


# --- fake / meta implementation ---


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("leading", X_LEADING, ids=lambda s: "x".join(map(str, s)))
def test_fake_tensor_mode_gives_output_shape(leading, symmetric):
    spec = QuantSpec(4, 64, symmetric)
    packed, _, _ = make_case(576, spec, torch.bfloat16)
    x = torch.randn(*leading, 576).to(torch.bfloat16)
    with FakeTensorMode() as mode:
        args = [
            mode.from_tensor(a) if isinstance(a, torch.Tensor) else a
            for a in (op_args(x, packed, spec, 576))
        ]
        y = OP(*args)
    assert y.shape == (*leading, N)
    assert y.dtype == torch.bfloat16


def test_meta_tensors_give_output_shape():
    spec = QuantSpec(8, PER_CHANNEL, symmetric=True)
    packed, _, _ = make_case(256, spec, torch.float32)
    args = op_args(torch.randn(2, 5, 256), packed, spec, 256)
    y = OP(*(a.to("meta") if isinstance(a, torch.Tensor) else a for a in args))
    assert y.device.type == "meta"
    assert y.shape == (2, 5, N)


@pytest.mark.parametrize(
    ("bits", "group_size", "symmetric"),
    [(4, 64, False), (4, PER_CHANNEL, True), (8, 32, False), (8, PER_CHANNEL, True)],
)
def test_opcheck(bits, group_size, symmetric):
    """Schema, fake-tensor, autograd-registration and AOT-dispatch checks of torch.library.

    No input requires grad (the op has no backward; QuantLinear runs it for inference only),
    so test_autograd_registration checks only that the op does not claim autograd support it
    lacks; all four sub-tests apply and run.
    """
    spec = QuantSpec(bits, group_size, symmetric)
    packed, _, _ = make_case(256, spec, torch.float32)
    for x in (torch.randn(3, 256), torch.randn(2, 5, 256).to(torch.bfloat16)):
        torch.library.opcheck(OP.default, op_args(x, packed, spec, 256))


# --- QuantLinear ---


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    ("bits", "group_size", "symmetric", "has_bias"),
    [
        (4, 64, False, True),
        (4, 32, True, False),
        (8, PER_CHANNEL, True, True),
        (8, 64, False, False),
    ],
)
def test_quant_linear_forward(bits, group_size, symmetric, has_bias, dtype):
    spec = QuantSpec(bits, group_size, symmetric)
    gen = torch.Generator().manual_seed(3)
    weight = torch.randn(N, 576, generator=gen) * 0.05
    bias = torch.randn(N, generator=gen).to(dtype) if has_bias else None
    layer = QuantLinear.from_packed(rtn_quantize(weight, spec, dtype), spec, bias, dtype)
    assert (layer.in_features, layer.out_features) == (576, N)
    assert layer.weight_scale.dtype == dtype
    assert (layer.weight_zero_point is None) == symmetric
    assert layer.weight_shape.tolist() == [N, 576]

    qparams = choose_qparams(weight, spec, dtype)
    w_deq = dequantize(quantize(weight, qparams, spec), qparams, spec, dtype=dtype)
    x = torch.randn(2, 5, 576, generator=gen).to(dtype)
    expected = F.linear(x, w_deq)
    if bias is not None:
        expected = expected + bias
    with cpu_kernel("reference"):
        y = layer(x)
    assert y.shape == (2, 5, N)
    assert y.dtype == dtype
    # Same dequantization and the same matmul in the same dtype: bit-identical.
    torch.testing.assert_close(y, expected, rtol=0, atol=0)
    # The packed CPU path (the default) computes the same within the dtype's rounding.
    packed = layer(x)
    error = ((packed.double() - expected.double()).norm() / expected.double().norm()).item()
    assert error < REL_TOL[dtype] * (1 if dtype == torch.bfloat16 else 10), error


def int4_float32_layer(gen: torch.Generator) -> QuantLinear:
    """A float32 QuantLinear (N, 256), INT4 g64 asymmetric, of random weights."""
    spec = QuantSpec(4, 64, symmetric=False)
    weight = torch.randn(N, 256, generator=gen) * 0.05
    return QuantLinear.from_packed(
        rtn_quantize(weight, spec, torch.float32), spec, None, torch.float32
    )


def test_quant_linear_backward_through_x():
    """With x requiring grad, the gradient for x is dL/dy · W of the dequantized weight (the
    packed weights stay frozen); in inference the op runs without an autograd node."""
    gen = torch.Generator().manual_seed(11)
    layer = int4_float32_layer(gen)
    x = torch.randn(2, 3, 256, generator=gen, requires_grad=True)
    layer(x).square().sum().backward()
    dense_x = x.detach().clone().requires_grad_()
    F.linear(dense_x, layer.dequantized_weight()).square().sum().backward()
    assert x.grad.abs().sum() > 0
    torch.testing.assert_close(x.grad, dense_x.grad, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        assert layer(x).grad_fn is None


def test_quant_linear_compiles_to_one_graph_with_the_op():
    """torch.compile traces QuantLinear whole (fullgraph: no graph break in its forward) and
    keeps compress::dequant_matmul as one node; the compiled layer computes what eager does.
    It does not single out the registered fake implementation: the pure-PyTorch default also
    runs on fake and meta tensors, so neither this test nor test_opcheck fails without it."""
    gen = torch.Generator().manual_seed(12)
    layer = int4_float32_layer(gen)
    graphs: list[torch.fx.GraphModule] = []

    def recording_backend(graph: torch.fx.GraphModule, example_inputs: list) -> object:
        graphs.append(graph)
        return graph.forward

    compiled = torch.compile(layer, fullgraph=True, backend=recording_backend)
    x = torch.randn(2, 3, 256, generator=gen)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), layer(x), rtol=0, atol=0)
    assert len(graphs) == 1
    targets = [node.target for node in graphs[0].graph.nodes if node.op == "call_function"]
    assert targets.count(OP.default) == 1, targets


def test_quant_linear_state_dict_names():
    spec = QuantSpec(4, 64, symmetric=False)
    layer = QuantLinear.from_packed(
        rtn_quantize(torch.randn(N, 256), spec, torch.bfloat16),
        spec,
        torch.zeros(N, dtype=torch.bfloat16),
        torch.bfloat16,
    )
    assert set(layer.state_dict()) == {
        "weight_packed",
        "weight_scale",
        "weight_zero_point",
        "weight_shape",
        "bias",
    }


def test_quant_linear_int4_g64_stored_bytes():
    out_features, in_features = 1536, 576
    spec = QuantSpec(4, 64, symmetric=False)
    weight = torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(4))
    layer = QuantLinear.from_packed(
        rtn_quantize(weight, spec, torch.bfloat16), spec, None, torch.bfloat16
    )
    bf16_bytes = out_features * in_features * 2
    expected = (
        out_features * in_features // 2  # packed nibbles
        + out_features * (in_features // 64) * 2  # bf16 scales
        + (out_features * 4 // 32) * (in_features // 64) * 4  # packed int32 zero points
        + 2 * 8  # weight_shape, int64 (2,)
    )
    assert layer.stored_bytes() == expected
    assert layer.stored_bytes() <= 0.3 * bf16_bytes


# ------------------------------------------------------------------- the packed CPU path


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("rows", [1, 3, 7, 33])
@pytest.mark.parametrize(
    ("bits", "group_size", "symmetric"),
    [(4, 32, False), (4, 64, False), (4, 128, True), (4, 256, False), (8, PER_CHANNEL, True)],
)
def test_packed_cpu_path_against_float64(dtype, rows, bits, group_size, symmetric):
    """torch's packed matmuls behind the op, over the group sizes and row counts they take."""
    k = 1024 if group_size == 256 else 576 if group_size != 128 else 640  # 640 = 5 × 128
    spec = QuantSpec(bits, group_size, symmetric)
    packed, reference, _ = make_case(k, spec, dtype)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows)).to(dtype)
    y = OP(*op_args(x, packed, spec, k))
    expected = x.double() @ reference.T
    error = ((y.double() - expected).norm() / expected.norm()).item()
    tolerance = REL_TOL[torch.bfloat16] if dtype != torch.float32 else 1e-4
    assert y.dtype == dtype and error < tolerance, error
    assert getattr(packed.weight_packed, "_compress_operands", None) is not None  # packed


def test_packed_operands_are_remade_after_an_in_place_change():
    spec = QuantSpec(4, 64, symmetric=False)
    packed, _, _ = make_case(576, spec, torch.bfloat16)
    other, other_reference, _ = make_case(576, spec, torch.bfloat16, seed=1)
    x = torch.randn(2, 576, dtype=torch.bfloat16)
    OP(*op_args(x, packed, spec, 576))
    first = packed.weight_packed._compress_operands.value[0]
    packed.weight_packed.copy_(other.weight_packed)  # what load_state_dict does
    packed.weight_scale.copy_(other.weight_scale)
    packed.weight_zero_point.copy_(other.weight_zero_point)
    y = OP(*op_args(x, packed, spec, 576))
    assert packed.weight_packed._compress_operands.value[0] is not first
    expected = x.double() @ other_reference.T
    assert ((y.double() - expected).norm() / expected.norm()).item() < 1e-2


@pytest.mark.parametrize("bits", [4, 8])
def test_packed_operands_are_remade_for_another_scale_tensor(bits):
    """A different scale tensor with the same version counter (a fresh copy, modified once as
    the original was), or new memory swapped in through `.data` (which counts no version),
    is not mistaken for the scales the cached operands were made from."""
    spec = QuantSpec(bits, 64 if bits == 4 else PER_CHANNEL, symmetric=bits == 8)
    packed, _, _ = make_case(576, spec, torch.float32)
    x = torch.randn(2, 576, generator=torch.Generator().manual_seed(4))
    doubled = 2 * packed.weight_scale
    same_version(doubled, packed.weight_scale)
    args = list(op_args(x, packed, spec, 576))
    first = OP(*args)
    args[2] = doubled
    torch.testing.assert_close(OP(*args), 2 * first, rtol=1e-4, atol=1e-5)
    args[2] = packed.weight_scale
    torch.testing.assert_close(OP(*args), first, rtol=0, atol=0)
    version = packed.weight_scale._version
    packed.weight_scale.data = 3 * packed.weight_scale
    assert packed.weight_scale._version == version
    torch.testing.assert_close(OP(*args), 3 * first, rtol=1e-4, atol=1e-5)


def test_packed_operands_are_not_fooled_by_reused_memory():
    """Scales freed after a call and new ones at the same address with the same version: the
    cache keeps the scales it was made from alive, so the address cannot come back. (The
    allocator hands a freed block back often, not always: twenty rounds.)"""
    spec = QuantSpec(4, 64, symmetric=False)
    packed, _, _ = make_case(576, spec, torch.float32)
    x = torch.randn(2, 576, generator=torch.Generator().manual_seed(5))
    args = list(op_args(x, packed, spec, 576))
    first = OP(*args)
    for factor in range(2, 22):
        args[2] = None  # the last round's scales go, unless the cache holds them
        args[2] = torch.empty_like(packed.weight_scale)
        torch.mul(packed.weight_scale, factor, out=args[2])  # version 1, as every round's
        expected = factor * first
        assert ((OP(*args) - expected).norm() / expected.norm()).item() < REL_TOL[torch.float32]


def test_packed_path_takes_weights_made_under_inference_mode():
    spec = QuantSpec(4, 64, symmetric=False)
    with torch.inference_mode():  # inference tensors have no version counter
        packed, reference, _ = make_case(576, spec, torch.bfloat16)
        x = torch.randn(2, 576, dtype=torch.bfloat16)
        y = OP(*op_args(x, packed, spec, 576))
    expected = x.double() @ reference.T
    assert ((y.double() - expected).norm() / expected.norm()).item() < 1e-2


def test_torch_int4_zero_convention():
    """Ours (q − zero)·s equals torch's (q − 8)·s + z with z = (8 − zero)·s, exactly in fp32."""
    spec = QuantSpec(4, 32, symmetric=False)
    packed, reference, _ = make_case(64, spec, torch.float32)
    _, scales_and_zeros = cpu_int4_operands(
        packed.weight_packed, packed.weight_scale, packed.weight_zero_point, torch.float32
    )
    from compress.kernels import _unpacked_codes

    codes = _unpacked_codes(packed.weight_packed, 4).double().view(N, 2, 32)
    scale, zero = scales_and_zeros.double().transpose(0, 1).unbind(-1)  # (N, G) each
    rebuilt = ((codes - 8) * scale.unsqueeze(-1) + zero.unsqueeze(-1)).view(N, 64)
    torch.testing.assert_close(rebuilt, reference, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    ("bits", "group_size", "symmetric"), [(4, PER_CHANNEL, True), (8, 64, False), (8, 32, True)]
)
def test_layouts_torch_cannot_take_use_the_reference_path(bits, group_size, symmetric):
    spec = QuantSpec(bits, group_size, symmetric)
    packed, _, _ = make_case(256, spec, torch.bfloat16)
    x = torch.randn(3, 256, dtype=torch.bfloat16)
    y = OP(*op_args(x, packed, spec, 256))
    with cpu_kernel("reference"):
        expected = OP(*op_args(x, packed, spec, 256))
    torch.testing.assert_close(y, expected, rtol=0, atol=0)
    assert getattr(packed.weight_packed, "_compress_operands", None) is None


def test_unknown_cpu_kernel_is_refused():
    with pytest.raises(ValueError, match="cpu_kernel 'fast'"), cpu_kernel("fast"):
        pass
