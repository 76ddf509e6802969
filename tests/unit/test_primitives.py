"""Affine quantization primitives: error bound, integer ranges, zero points, scale rounding."""

from __future__ import annotations

import pytest
import torch

from compress.quant.config import PER_CHANNEL
from compress.quant.primitives import (
    QuantSpec,
    RangeSearch,
    choose_qparams,
    dequantize,
    fake_quantize,
    quantize,
)

N, K = 48, 256
BITS = (4, 8)
GROUP_SIZES = (PER_CHANNEL, 32, 64, 128)
SCALE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
F32_EPS = torch.finfo(torch.float32).eps  # 2^-23

ZERO_ROW, POSITIVE_ROW, NEGATIVE_ROW, TINY_ROW = 0, 1, 2, 3


def make_weight(seed: int = 0) -> torch.Tensor:
    """Random (N, K) float32 weight with the awkward cases a real layer can contain."""
    gen = torch.Generator().manual_seed(seed)
    # Rows of different magnitudes, so groups differ in scale by orders of magnitude.
    w = torch.randn(N, K, generator=gen) * torch.logspace(-2, 1, N).unsqueeze(1)
    w[ZERO_ROW] = 0.0
    w[POSITIVE_ROW] = w[POSITIVE_ROW].abs() + 0.01
    w[NEGATIVE_ROW] = -w[NEGATIVE_ROW].abs() - 0.01
    w[TINY_ROW] = torch.randn(K, generator=gen) * 1e-7  # below fp16's smallest normal scale
    # Outliers: a handful of large entries of either sign in otherwise ordinary rows.
    w[10, 3] = 60.0
    w[11, 200] = -75.0
    w[20, 127] = 33.0
    w[20, 128] = -33.0
    return w


def expand(per_group: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """(N, G) → (N, K): each group's value repeated over the group's columns."""
    return per_group.repeat_interleave(spec.group_len(K), dim=1)


ALL_CASES = [
    pytest.param(bits, gs, sym, dt, id=f"int{bits}-g{gs}-{'sym' if sym else 'asym'}-{dt}")
    for bits in BITS
    for gs in GROUP_SIZES
    for sym in (True, False)
    for dt in SCALE_DTYPES
]


@pytest.fixture(scope="module")
def weight() -> torch.Tensor:
    return make_weight()


@pytest.mark.parametrize(("bits", "group_size", "symmetric", "scale_dtype"), ALL_CASES)
def test_round_trip_error_is_at_most_half_a_step(weight, bits, group_size, symmetric, scale_dtype):
    spec = QuantSpec(bits, group_size, symmetric)
    qparams = choose_qparams(weight, spec, scale_dtype)
    assert qparams.scale.dtype == scale_dtype
    assert qparams.scale.shape == (N, spec.num_groups(K))
    q = quantize(weight, qparams, spec)
    # Dequantize in float64: (q - z) has ≤ 9 significant bits and the scale ≤ 24, so the
    # product is exact and the only error left is the one quantize() made.
    recon = dequantize(q, qparams, spec, dtype=torch.float64)
    step = expand(qparams.scale.to(torch.float64), spec)
    err = (weight.to(torch.float64) - recon).abs()
    # Theory: |w - dq(q(w))| ≤ scale/2 exactly. quantize() evaluates w / scale in float32; with
    # |w / scale| ≤ 2^bits the quotient is off by at most 2^bits · 2^-24 steps, which can move a
    # value sitting just at a half step by that much past scale/2 (measured: ~7.6e-6 steps at
    # 8 bits). The slack 2^bits · eps32 (3e-5 steps at 8 bits, 2e-6 at 4) covers that with
    # margin and is far below what any real bug (a wrong zero, a scale too small) produces.
    bound = step * (0.5 + (1 << bits) * F32_EPS)
    worst = (err / step).max().item()
    assert (err <= bound).all(), f"worst error {worst:.8f} steps > 0.5"


@pytest.mark.parametrize(("bits", "group_size", "symmetric", "scale_dtype"), ALL_CASES)
def test_integer_and_zero_point_ranges(weight, bits, group_size, symmetric, scale_dtype):
    spec = QuantSpec(bits, group_size, symmetric)
    qparams = choose_qparams(weight, spec, scale_dtype)
    q = quantize(weight, qparams, spec)
    qmax = (1 << bits) - 1
    assert q.dtype == torch.int32
    assert q.shape == weight.shape
    assert int(q.min()) >= 0
    assert int(q.max()) <= qmax
    # The grid is actually used end to end (a scale twice too large would use half of it).
    # Symmetric scales map ±absmax to ±(2^(bits-1) - 0.5) steps, so the lowest code 0 is only
    # reached when a value rounds exactly onto it; the all-negative row reaches code 1.
    assert int(q.min()) <= (1 if symmetric else 0)
    assert int(q.max()) == qmax
    assert qparams.zero.dtype == torch.int32
    assert qparams.zero.shape == (N, spec.num_groups(K))
    assert int(qparams.zero.min()) >= 0
    assert int(qparams.zero.max()) <= qmax
    if symmetric:
        assert (qparams.zero == 1 << (bits - 1)).all()
        assert spec.mid == 1 << (bits - 1)
    else:
        # Groups with no negative weight put 0.0 at the bottom of the grid.
        assert (qparams.zero[POSITIVE_ROW] == 0).all()
        assert (qparams.zero[ZERO_ROW] == 0).all()
        # Groups with no positive weight put it near the top (the rounded-up scale may leave
        # the top step unused, so only "upper half" is guaranteed).
        assert (qparams.zero[NEGATIVE_ROW] > qmax // 2).all()


@pytest.mark.parametrize(("bits", "group_size", "symmetric", "scale_dtype"), ALL_CASES)
def test_zero_is_represented_exactly(weight, bits, group_size, symmetric, scale_dtype):
    spec = QuantSpec(bits, group_size, symmetric)
    qparams = choose_qparams(weight, spec, scale_dtype)
    zero_point = expand(qparams.zero, spec)
    # dequantize(zero point) == 0.0 exactly, in every dtype.
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        assert (dequantize(zero_point, qparams, spec, dtype=dtype) == 0).all()
    # ... and 0.0 quantizes to the zero point, so exact zeros (padding, pruned weights) survive.
    assert torch.equal(quantize(torch.zeros_like(weight), qparams, spec), zero_point)
    recon = dequantize(quantize(weight, qparams, spec), qparams, spec)
    assert (recon[ZERO_ROW] == 0).all()


@pytest.mark.parametrize("scale_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", GROUP_SIZES)
@pytest.mark.parametrize("bits", BITS)
def test_low_precision_scales_round_up_by_at_most_one_step(
    weight, bits, group_size, symmetric, scale_dtype
):
    spec = QuantSpec(bits, group_size, symmetric)
    exact = choose_qparams(weight, spec, torch.float32).scale
    stored = choose_qparams(weight, spec, scale_dtype).scale
    # Never smaller: a scale rounded down would clip the group's extremes.
    assert (stored.to(torch.float32) >= exact).all()
    # Never more than needed: the representable value just below the stored one is too small
    # (except where the scale sits at the dtype's smallest normal value, the floor it is
    # clamped to).
    below = (stored.view(torch.int16) - 1).view(scale_dtype).to(torch.float32)
    clamped = stored == torch.finfo(scale_dtype).tiny
    assert ((below < exact) | clamped).all()


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", BITS)
def test_float32_scale_matches_formula(weight, bits, symmetric):
    spec = QuantSpec(bits, 64, symmetric)
    scale = choose_qparams(weight, spec, torch.float32).scale
    groups = weight.reshape(N, K // 64, 64)
    qmax = (1 << bits) - 1
    if symmetric:
        expected = groups.abs().amax(-1) / (qmax / 2)
    else:
        expected = (groups.amax(-1).clamp_min(0) - groups.amin(-1).clamp_max(0)) / qmax
    expected = expected.clamp_min(torch.finfo(torch.float32).tiny)
    torch.testing.assert_close(scale, expected, rtol=1e-6, atol=0)


def test_fp16_scale_of_tiny_group_is_clamped_to_smallest_normal(weight):
    spec = QuantSpec(4, 64, symmetric=True)
    scale = choose_qparams(weight, spec, torch.float16).scale
    assert (scale[TINY_ROW] == torch.finfo(torch.float16).tiny).all()
    assert torch.isfinite(scale).all()
    assert (scale > 0).all()


@pytest.mark.parametrize(("bits", "group_size", "symmetric", "scale_dtype"), ALL_CASES)
def test_fake_quantize_equals_dequantize_of_quantize(
    weight, bits, group_size, symmetric, scale_dtype
):
    spec = QuantSpec(bits, group_size, symmetric)
    qparams = choose_qparams(weight, spec, scale_dtype)
    expected = dequantize(quantize(weight, qparams, spec), qparams, spec)
    got = fake_quantize(weight, spec, scale_dtype)
    assert got.dtype == torch.float32
    assert torch.equal(got, expected)


def test_quantize_accepts_low_precision_weights():
    weight = make_weight(seed=1).to(torch.bfloat16)
    spec = QuantSpec(4, 32, symmetric=False)
    qparams = choose_qparams(weight, spec, torch.bfloat16)
    recon = dequantize(quantize(weight, qparams, spec), qparams, spec, dtype=torch.float64)
    step = expand(qparams.scale.to(torch.float64), spec)
    assert ((weight.to(torch.float64) - recon).abs() <= step * (0.5 + 16 * F32_EPS)).all()


def test_per_channel_has_one_group():
    spec = QuantSpec(8, PER_CHANNEL, symmetric=True)
    assert spec.num_groups(K) == 1
    assert spec.group_len(K) == K
    assert choose_qparams(make_weight(), spec).scale.shape == (N, 1)


@pytest.mark.parametrize("group_size", [48, 100, 512])
def test_group_size_not_dividing_in_features_raises(group_size):
    spec = QuantSpec(4, group_size, symmetric=False)
    weight = make_weight()
    assert not spec.divides(K)
    with pytest.raises(ValueError, match=rf"group_size {group_size} does not divide .*{K}"):
        choose_qparams(weight, spec)
    good = QuantSpec(4, 64, symmetric=False)
    qparams = choose_qparams(weight, good)
    with pytest.raises(ValueError, match="does not divide"):
        quantize(weight, qparams, spec)
    with pytest.raises(ValueError, match="does not divide"):
        dequantize(quantize(weight, qparams, good), qparams, spec)
    with pytest.raises(ValueError, match="does not divide"):
        fake_quantize(weight, spec, torch.float32)


def _weighted_error(w, qparams, spec, norm, importance=None) -> torch.Tensor:
    """Per-group Σ importance · |w − ŵ|^norm, computed independently of the search code."""
    error = (dequantize(quantize(w, qparams, spec), qparams, spec) - w).abs() ** norm
    if importance is not None:
        error = error * importance
    return error.reshape(N, spec.num_groups(K), -1).sum(-1)


@pytest.mark.parametrize(("bits", "group_size", "symmetric", "scale_dtype"), ALL_CASES)
def test_range_search_never_loses_to_minmax_and_keeps_the_invariants(
    weight, bits, group_size, symmetric, scale_dtype
):
    spec = QuantSpec(bits, group_size, symmetric)
    search = RangeSearch()
    importance = torch.rand(K, generator=torch.Generator().manual_seed(1)) + 0.1
    minmax = choose_qparams(weight, spec, scale_dtype)
    searched = choose_qparams(weight, spec, scale_dtype, search=search, importance=importance)
    before = _weighted_error(weight, minmax, spec, search.norm, importance)
    after = _weighted_error(weight, searched, spec, search.norm, importance)
    assert bool((after <= before * (1 + 1e-6) + 1e-30).all())
    assert searched.scale.dtype == scale_dtype
    assert bool((searched.zero >= 0).all() and (searched.zero <= spec.qmax).all())
    if symmetric:
        assert bool((searched.zero == spec.mid).all())
    # A searched range is never wider than min/max's.
    assert bool((searched.scale.float() <= minmax.scale.float()).all())


def test_range_search_clips_a_lone_outlier_for_a_lower_total_error():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(64, 128, generator=gen)
    w[:, 0] = 12.0  # one outlier per row stretches min/max's grid
    spec = QuantSpec(4, -1, False)
    minmax = choose_qparams(w, spec)
    searched = choose_qparams(w, spec, search=RangeSearch())
    assert bool((searched.scale < minmax.scale).any())
    err = {
        name: float((dequantize(quantize(w, q, spec), q, spec) - w).pow(2).sum())
        for name, q in (("minmax", minmax), ("searched", searched))
    }
    assert err["searched"] < err["minmax"]


def test_range_search_checks_importance_shape(weight):
    with pytest.raises(ValueError, match="importance"):
        choose_qparams(
            weight, QuantSpec(4, 32, True), search=RangeSearch(), importance=torch.ones(K + 1)
        )
