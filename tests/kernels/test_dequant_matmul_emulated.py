"""cuda_ext's own kernel source, run on the CPU by the CUDA emulator, against float32 references.

The GPU tests (test_dequant_matmul_cuda.py) need a device; these run the same kernels and
launch plans (cuda_ext/dequant_matmul_kernels.cuh) everywhere, one fiber per CUDA thread,
so the indexing, the packed-layout reads, the split-K reduction and the row tiling are
proven on every CI run. Inputs and outputs sit between guard bands (NaN for floating
tensors), outputs start as NaN: a read out of bounds poisons the result, a write out of
bounds or a missed output is seen.
"""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import pytest
import torch

from compress import cuda_ops, kernels
from compress.kernels import (
    CUDA_GEMV_MAX_ROWS,
    CUDA_GEMV_ROWS,
    CUDA_MMA_MAX_ROWS,
    _dequant_matmul_cuda,
)
from compress.quant.config import PER_CHANNEL
from compress.quant.primitives import QuantSpec
from tests.kernels import cuda_emulator
from tests.kernels.cases import MORE_SCHEMES, SCHEMES, packed_case, same_version

# Every accumulator tile (1, 2, 4, 8, 16 rows), full and partly filled.
ROWS = (1, 2, 3, 4, 7, 9, CUDA_GEMV_MAX_ROWS)
# (N, K): N = 13 leaves the last block of 2 or 4 rows partly empty; K = odd multiples of the
# group, one K long enough that each lane takes a second, partial step along K, and the demo
# model's hidden size (where the group divides it).
SHAPES = [(13, 384), (5, 1408), (3, 576)]
# Relative Frobenius error against float32: fp16 / bf16 activations and outputs (11 / 8
# significant bits), float32 accumulation. An indexing mistake gives errors near 1.
REL_TOL = {torch.float16: 2e-3, torch.bfloat16: 1e-2}
GUARD_BYTES = 64  # keeps the guarded tensors 16-byte aligned, as the CUDA allocator does


@pytest.fixture(scope="module")
def emulator() -> cuda_emulator.EmulatedKernels:
    kernels = cuda_emulator.load()
    if isinstance(kernels, str):
        pytest.skip(f"cannot build the CUDA emulator: {kernels}")
    return kernels


def guarded(tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A copy of `tensor` inside a buffer with guard bands: (view, whole buffer)."""
    pad = GUARD_BYTES // tensor.element_size()
    fill = float("nan") if tensor.is_floating_point() else -(2**31)
    buffer = torch.full((tensor.numel() + 2 * pad,), fill, dtype=tensor.dtype)
    view = buffer[pad : pad + tensor.numel()].view(tensor.shape)
    view.copy_(tensor)
    return view, buffer


def assert_guards_intact(buffer: torch.Tensor, length: int) -> None:
    pad = GUARD_BYTES // buffer.element_size()
    for band in (buffer[:pad], buffer[pad + length :]):
        if buffer.is_floating_point():
            assert torch.isnan(band).all(), "a kernel wrote outside its output"
        else:
            assert (band == -(2**31)).all(), "a kernel wrote outside its output"


def assert_matches_reference(out, out_buffer, x, reference, what) -> None:
    """A kernel's (M, N) output: written inside its guard bands, every element of it, and
    within the dtype's tolerance of x · referenceᵀ in float32."""
    assert_guards_intact(out_buffer, out.numel())
    assert torch.isfinite(out).all(), f"{what}: outputs not written"
    expected = x.float() @ reference.t()
    error = float((out.float() - expected).norm() / expected.norm())
    assert error < REL_TOL[out.dtype], (what, error)


def assert_dequantizes_bit_exact(emulator, args, reference, dtype) -> None:
    """The dequantize kernel on `args` (packed, scale, zero, bits, group size, K) writes
    inside its guard bands exactly (q − z)·s in float32 rounded once to dtype: what
    dequantize_packed computes on the CPU."""
    n, k = reference.shape
    out, buffer = guarded(torch.full((n, k), float("nan"), dtype=dtype))
    emulator.dequantize(*args, out=out)
    assert_guards_intact(buffer, n * k)
    assert torch.equal(out, reference.to(dtype)), "not bit-exact"


def make_case(n: int, k: int, spec: QuantSpec, dtype: torch.dtype, seed: int):
    """packed_case's operands, each inside guard bands, and the float32 reference."""
    packed, reference = packed_case(n, k, spec, dtype, seed)
    operands = [
        None if t is None else guarded(t)[0]
        for t in (packed.weight_packed, packed.weight_scale, packed.weight_zero_point)
    ]
    return operands, reference


def spec_id(spec: QuantSpec) -> str:
    return f"int{spec.bits}-g{spec.group_size}-{'sym' if spec.symmetric else 'asym'}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("spec", SCHEMES, ids=spec_id)
def test_gemv_matches_float32_reference(emulator, spec, dtype):
    for n, k in filter(lambda shape: spec.divides(shape[1]), SHAPES):
        (weight_packed, scale, zero), reference = make_case(n, k, spec, dtype, seed=n * k)
        for m in ROWS:
            gen = torch.Generator().manual_seed(m)
            x, _ = guarded(torch.randn(m, k, generator=gen).to(dtype))
            out, out_buffer = guarded(torch.full((m, n), float("nan"), dtype=dtype))
            emulator.gemv(x, weight_packed, scale, zero, spec.bits, spec.group_size, k, out=out)
            assert_matches_reference(out, out_buffer, x, reference, f"M={m}, N={n}, K={k}")


# The tensor-core path: one m-tile (≤ 16 rows), two, four; full and partly filled.
MMA_ROWS = (1, 5, 16, 17, 33, CUDA_MMA_MAX_ROWS)
# (N, K, sm_count): two blocks of 128 rows n on a device they fill (one pass over K; the
# second block's last warps are past N and its first is partly), K with a partial last chunk
# (576 for INT4 and 592 for INT8, where the group divides it), and a short N with many chunks
# on a small device, so that the plan splits K across blocks and sums the splits.
MMA_SHAPES = [(136, 640, 1), (136, 576, 1), (40, 592, 1), (24, 2048, 4)]


def expected_scale_modes(spec: QuantSpec) -> set[str]:
    """Where the plan applies the scales (compress_kernels::ScaleMode): once at the end per
    channel; per chunk where a chunk of four slices lies in one group, up to 32 rows, on the
    weights above that; on the weights for smaller groups."""
    if spec.group_size == PER_CHANNEL:
        return {"end"}
    if spec.group_size % (4 * kernels.mma_slice(spec.bits)) == 0:
        return {"chunk", "weights"}
    return {"weights"}


def mma_runs(spec: QuantSpec, shape: tuple[int, int, int]) -> bool:
    k = shape[1]
    return spec.divides(k) and kernels.mma_takes_shape(spec.bits, spec.group_size, k)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("spec", SCHEMES, ids=spec_id)
def test_mma_gemm_matches_float32_reference(emulator, spec, dtype):
    splits, scale_modes = set(), set()
    for n, k, sm_count in filter(lambda shape: mma_runs(spec, shape), MMA_SHAPES):
        (weight_packed, scale, zero), reference = make_case(n, k, spec, dtype, seed=n + k)
        for m in MMA_ROWS:
            gen = torch.Generator().manual_seed(m)
            x, _ = guarded(torch.randn(m, k, generator=gen).to(dtype))
            out, out_buffer = guarded(torch.full((m, n), float("nan"), dtype=dtype))
            emulator.mma_gemm(
                x, weight_packed, scale, zero, spec.bits, spec.group_size, k, out=out,
                sm_count=sm_count,
            )  # fmt: skip
            splits.add(emulator.last_splits)
            scale_modes.add(emulator.last_scales)
            assert_matches_reference(out, out_buffer, x, reference, f"M={m}, N={n}, K={k}")
    assert 1 in splits and max(splits) > 1, f"single-pass and split-K plans both ran: {splits}"
    assert scale_modes == expected_scale_modes(spec), scale_modes


# (rows M, sm_count, splits it gives): the last block adds M · splits partial sums per row n,
# 16 loads at a time; 7 × 3 and 21 × 3 (four batches, the most it takes) end a batch in the
# middle of a row's splits.
SPLIT_SUMS = [(5, 4, 4), (7, 3, 3), (21, 3, 3)]


@pytest.mark.parametrize(("m", "sm_count", "splits"), SPLIT_SUMS)
def test_split_k_sums_in_the_kernel_whatever_the_block_order(emulator, m, sm_count, splits):
    """With K split across blocks, the block of the split that finishes last adds all the
    splits' partial sums (no second kernel): bit for bit what the second kernel computes, in
    whichever order the blocks run, and the tile counters are zeros again after every launch
    (the emulated op reports it otherwise)."""
    n, k, spec = 136, 2048, QuantSpec(4, 128, False)  # two columns of blocks
    (weight_packed, scale, zero), reference = make_case(n, k, spec, torch.float16, seed=9)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(9)).half()
    args = (weight_packed, scale, zero, spec.bits, spec.group_size, k)

    def run(**options) -> torch.Tensor:
        out = torch.full((m, n), float("nan"), dtype=torch.float16)
        return emulator.mma_gemm(x, *args, out=out, sm_count=sm_count, **options)

    separate = run(separate_sum=True)
    assert emulator.last_splits == splits and not emulator.last_summed_in_kernel
    expected = x.float() @ reference.t()
    assert float((separate.float() - expected).norm() / expected.norm()) < REL_TOL[torch.float16]
    try:
        for seed in (0, 1, 2, 3, 4):
            emulator.set_block_order(seed)
            summed_in_kernel = run()
            assert emulator.last_summed_in_kernel
            assert torch.equal(summed_in_kernel, separate), f"block order {seed}"
    finally:
        emulator.set_block_order(0)


# SplitKCounterSets steps: (device, stream, capture id or None, release).
EAGER_A, EAGER_B, CAPTURE_1, CAPTURE_2 = (0, 11, None, False), (0, 12, None, False), 101, 102


def test_split_k_counter_sets_are_shared_only_by_launches_that_cannot_overlap(emulator):
    """Launches outside a capture share their stream's set; every capture gets sets apart
    from those and from every other capture, one per stream it records on (a forked capture's
    branches may run at once), whatever stream the capture was recorded on."""
    run = emulator.counter_sets(8, 32, [
        EAGER_A, EAGER_B, EAGER_A,                 # 0 1 0: a set per stream
        (0, 11, CAPTURE_1, False),                 # 2: the capture on stream A, apart from A's
        (0, 11, CAPTURE_1, False),                 # 2: later launches of the same capture
        (0, 12, CAPTURE_1, False),                 # 3: the capture forked onto stream B
        (0, 11, CAPTURE_2, False),                 # 4: a second graph captured on stream A
        (1, 11, None, False),                      # device 1 has a pool of its own
        EAGER_B,                                   # 1
    ])  # fmt: skip
    assert run.sets == [0, 1, 0, 2, 2, 3, 4, 0, 1]
    assert run.new_leases == [False, False, False, True, False, True, True, False, False]
    assert run.pools_made == [0, 1]
    assert run.usage == [(2, 3, 3), (1, 0, 7)]


def test_split_k_counter_sets_go_back_when_their_graph_is_destroyed(emulator):
    """A destroyed graph's sets are leased again; the streams' are kept. When every set is
    leased a launch gets none (a second kernel then adds its splits), until a graph hands one
    back. A capture before any launch outside one gets none and makes no pool: nothing may be
    allocated or zeroed outside the graph during a capture."""
    run = emulator.counter_sets(3, 32, [
        (0, 11, CAPTURE_1, False),                 # None: no pool yet
        EAGER_A,                                   # 0, and the pool
        (0, 11, CAPTURE_1, False),                 # 1
        (0, 11, CAPTURE_2, False),                 # 2
        (0, 12, None, False),                      # None: every set leased
        (0, 11, CAPTURE_1, True),                  # the first graph is destroyed
        (0, 11, CAPTURE_1, True),                  # a second release changes nothing
        EAGER_A,                                   # 0: a stream's set is never released
        (0, 11, None, True),
        (0, 12, None, False),                      # 1: the destroyed graph's set
        (0, 13, 103, False),                       # None again
    ])  # fmt: skip
    assert run.sets == [None, 0, 1, 2, None, None, None, 0, None, 1, None]
    assert run.new_leases == [False, False, True, True] + [False] * 7
    assert run.pools_made == [0]
    assert run.usage[0] == (2, 1, 0)


# (K, N) of Llama-3-8B's projections, Llama-3-70B's MLP and SmolLM2-135M's (hidden size 576).
PLAN_SHAPES = [
    (4096, 4096), (4096, 14336), (14336, 4096), (4096, 1024), (8192, 28672), (28672, 8192),
    (576, 1536), (1536, 576),
]  # fmt: skip


def test_mma_plan_launches_one_wave_at_most(emulator):
    """Where the kernel's occupancy is known, splitting K never makes more blocks than the SMs
    hold at once: a partial second wave would take about as long as the first. The cap only
    lowers the split count, every split keeps at least one chunk, the grid reaches one block
    per SM where K has the chunks for it, and the last block adds the splits itself only up
    to 64 partial sums per thread (a second kernel above)."""
    capped = 0
    for (k, n), m, sm_count, blocks_per_sm in itertools.product(
        PLAN_SHAPES, (1, 4, 8, 16, 17, 33, 64), (108, 132), (1, 2, 3, 4)
    ):
        plan = emulator.plan_mma(m, n, k, 128, 4, sm_count, blocks_per_sm)
        free = emulator.plan_mma(m, n, k, 128, 4, sm_count, 0)
        slots = sm_count * blocks_per_sm
        case = (k, n, m, sm_count, blocks_per_sm, plan)
        if plan["blocks_n"] <= slots:
            assert plan["blocks_n"] * plan["splits"] <= slots, case
        assert 1 <= plan["splits"] <= free["splits"], case
        chunks = -(-k // kernels.mma_slice(4) // 4)  # chunks of four 32-k slices, the last partial
        assert (plan["splits"] - 1) * plan["chunks_per_split"] < chunks, case
        # Up to one block per SM the partial sums' traffic does not limit the splits: no split
        # reads more of K than splitting into that many blocks gives it.
        one_per_sm = min(chunks, sm_count // plan["blocks_n"])
        if one_per_sm >= 1:
            assert plan["chunks_per_split"] <= -(-chunks // one_per_sm), case
        # The last block adds the splits while they are at most 64 partial sums per thread.
        in_kernel = plan["splits"] > 1 and m * plan["splits"] <= 64
        assert plan["sum_in_kernel"] == in_kernel, case
        capped += plan["splits"] < free["splits"]
    assert capped > 0, "no case where the one-wave cap changed the plan"
    # The case that motivated it: M = 64 on 4096×14336, whose kernel an H100 holds two of per
    # SM: uncapped, 112 × 3 = 336 blocks for 264 slots; capped, 112 × 2.
    assert emulator.plan_mma(64, 14336, 4096, 128, 4, 132, 0)["splits"] == 3
    assert emulator.plan_mma(64, 14336, 4096, 128, 4, 132, 2)["splits"] == 2


# (splits asked for, splits run) on K = 1952 (61 slices of 32 k: 16 chunks, the last of one
# slice): above 16 it takes one per chunk; 6 splits take 3 chunks each (the last 1), and 7 of
# 3 chunks would leave the seventh empty, so 7 runs as 6.
FORCED_SPLITS = [(1, 1), (2, 2), (6, 6), (7, 6), (16, 16), (40, 16)]


def test_forced_splits_compute_the_product_and_override_only_the_split(emulator):
    """The benchmark's splits override (the op's `splits`) runs the split asked for, at most
    one per chunk and none empty, whatever the plan would pick, and every such grid computes
    the product, with the splits added by the last block and by the second kernel."""
    n, k, spec, m = 136, 1952, QuantSpec(4, 32, False), 3
    (weight_packed, scale, zero), reference = make_case(n, k, spec, torch.float16, seed=13)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(13)).half()
    args = (weight_packed, scale, zero, spec.bits, spec.group_size, k)
    expected = x.float() @ reference.t()
    planned = emulator.plan_mma(m, n, k, spec.group_size, spec.bits, 132, 4)
    for asked, runs in FORCED_SPLITS:
        forced = emulator.plan_mma(m, n, k, spec.group_size, spec.bits, 132, 4, splits=asked)
        assert forced["splits"] == runs, (asked, forced)
        # Only the split changes: the kernel and its scales are the plan's.
        assert {f: forced[f] for f in ("m_rows", "scales", "blocks_n")} == {
            f: planned[f] for f in ("m_rows", "scales", "blocks_n")
        }
        for separate_sum in (False, True):
            out = torch.full((m, n), float("nan"), dtype=torch.float16)
            emulator.mma_gemm(x, *args, out=out, splits=asked, separate_sum=separate_sum)
            assert emulator.last_splits == runs
            assert emulator.last_summed_in_kernel == (runs > 1 and not separate_sum)
            error = float((out.float() - expected).norm() / expected.norm())
            assert error < REL_TOL[torch.float16], (asked, separate_sum, error)


def test_forced_sum_in_kernel_past_the_limit_matches_the_second_kernel(emulator):
    """The sweep's other override (the op's `sum_in_kernel`): the last block adds the splits
    past the plan's 64 sums per thread too (9 rows × 16 splits = 144 here), bit for bit what
    the second kernel adds, in whichever order the blocks run; and False sends splits the
    plan would sum in the kernel to the second kernel."""
    n, k, spec, m = 136, 1952, QuantSpec(4, 32, True), 9
    (weight_packed, scale, zero), reference = make_case(n, k, spec, torch.bfloat16, seed=14)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(14)).bfloat16()
    args = (weight_packed, scale, zero, spec.bits, spec.group_size, k)

    def run(**options) -> torch.Tensor:
        out = torch.full((m, n), float("nan"), dtype=torch.bfloat16)
        return emulator.mma_gemm(x, *args, out=out, splits=16, **options)

    assert not emulator.plan_mma(m, n, k, 32, 4, 132, 0, splits=16)["sum_in_kernel"]
    assert emulator.plan_mma(m, n, k, 32, 4, 132, 0, splits=16, sum_in_kernel=True)["sum_in_kernel"]
    separate = run()
    assert emulator.last_splits == 16 and not emulator.last_summed_in_kernel
    expected = x.float() @ reference.t()
    assert float((separate.float() - expected).norm() / expected.norm()) < REL_TOL[torch.bfloat16]
    try:
        for seed in (0, 5):
            emulator.set_block_order(seed)
            summed = run(sum_in_kernel=True)
            assert emulator.last_summed_in_kernel
            assert torch.equal(summed, separate), f"block order {seed}"
    finally:
        emulator.set_block_order(0)
    # Below the limit the plan sums in the kernel; False overrides that.
    assert emulator.plan_mma(1, n, k, 32, 4, 132, 0, splits=16)["sum_in_kernel"]
    forced_out = emulator.plan_mma(1, n, k, 32, 4, 132, 0, splits=16, sum_in_kernel=False)
    assert not forced_out["sum_in_kernel"]


def test_mma_gemm_with_a_one_wave_plan_matches_the_reference(emulator):
    """A plan the cap lowered (four splits wanted, two fit) computes the same product."""
    n, k, spec = 136, 2048, QuantSpec(4, 128, True)
    (weight_packed, scale, zero), reference = make_case(n, k, spec, torch.bfloat16, seed=11)
    x = torch.randn(17, k, generator=torch.Generator().manual_seed(11)).bfloat16()
    out = torch.full((17, n), float("nan"), dtype=torch.bfloat16)
    args = (weight_packed, scale, zero, spec.bits, spec.group_size, k)
    emulator.mma_gemm(x, *args, out=out, sm_count=4, blocks_per_sm=1)
    assert emulator.last_splits == 2 and emulator.last_summed_in_kernel
    expected = x.float() @ reference.t()
    assert float((out.float() - expected).norm() / expected.norm()) < REL_TOL[torch.bfloat16]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("spec", SCHEMES, ids=spec_id)
def test_dequantize_is_bit_exact(emulator, spec, dtype):
    n, k = 37, 384
    (weight_packed, scale, zero), reference = make_case(n, k, spec, dtype, seed=7)
    args = (weight_packed, scale, zero, spec.bits, spec.group_size, k)
    assert_dequantizes_bit_exact(emulator, args, reference, dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    ("spec", "n", "k"), MORE_SCHEMES, ids=lambda v: spec_id(v) if isinstance(v, QuantSpec) else v
)
def test_other_group_sizes_match_the_reference_on_every_kernel(emulator, spec, n, k, dtype):
    (weight_packed, scale, zero), reference = make_case(n, k, spec, dtype, seed=n + k)
    args = (weight_packed, scale, zero, spec.bits, spec.group_size, k)
    runs = [("gemv", m) for m in (1, 7, CUDA_GEMV_MAX_ROWS)]
    tensor_cores = kernels.mma_takes_shape(spec.bits, spec.group_size, k)
    if tensor_cores:
        runs += [("mma_gemm", m) for m in (1, 16, 33, CUDA_MMA_MAX_ROWS)]
    splits, scale_modes = set(), set()
    for kernel, m in runs:
        gen = torch.Generator().manual_seed(m)
        x, _ = guarded(torch.randn(m, k, generator=gen).to(dtype))
        out, out_buffer = guarded(torch.full((m, n), float("nan"), dtype=dtype))
        if kernel == "gemv":
            emulator.gemv(x, *args, out=out)
        else:
            emulator.mma_gemm(x, *args, out=out, sm_count=2)  # a small device: K is split
            splits.add(emulator.last_splits)
            scale_modes.add(emulator.last_scales)
        assert_matches_reference(out, out_buffer, x, reference, f"{kernel} M={m}")
    if tensor_cores:
        assert max(splits) > 1, splits
        assert scale_modes == expected_scale_modes(spec), scale_modes
    assert_dequantizes_bit_exact(emulator, args, reference, dtype)


@pytest.mark.parametrize("divisor", [1, 2, 3, 4, 7, 18, 96, 128, 448, 4095])
def test_small_divisor_is_exact(emulator, divisor):
    """The tensor-core kernel finds a slice's group without an integer division: a float
    estimate and a correction each way. Exact over the range it claims (n < 2^20), even with
    the reciprocal a few units in the last place off, as fast-math's is on the device."""
    for ulps in (-4, 0, 4):
        assert emulator.small_divisor_errors(divisor, 2**20, ulps) == 0, ulps


def test_gemv_rows_are_independent(emulator):
    """Row m of the output depends on row m of x only: no tile mixes its accumulators."""
    n, k, spec = 13, 384, QuantSpec(4, 64, False)
    (weight_packed, scale, zero), _ = make_case(n, k, spec, torch.float16, seed=3)
    x = torch.randn(CUDA_GEMV_MAX_ROWS, k, generator=torch.Generator().manual_seed(3)).half()
    together = emulator.gemv(x, weight_packed, scale, zero, 4, 64, k)
    for m in (0, 5, CUDA_GEMV_MAX_ROWS - 1):
        alone = emulator.gemv(x[m : m + 1].clone(), weight_packed, scale, zero, 4, 64, k)
        # The same per-row arithmetic in the same order, whatever the tile: bit-identical.
        assert torch.equal(together[m], alone[0]), m


def test_emulator_reports_a_misaligned_vector_load(emulator):
    """The kernel reads activations as 16-byte vectors; the CUDA op copies unaligned x first.

    On the device a misaligned vector load faults; the emulator must report it, not read it.
    """
    n, k, spec = 4, 256, QuantSpec(4, 128, True)
    (weight_packed, scale, zero), _ = make_case(n, k, spec, torch.float16, seed=4)
    buffer = torch.randn(k + 8).half()
    misaligned = buffer[1 : 1 + k].view(1, k)  # 2 bytes past a 16-byte boundary
    with pytest.raises(RuntimeError, match="misaligned __ldg"):
        emulator.gemv(misaligned, weight_packed, scale, zero, 4, 128, k)


def test_emulator_refuses_what_the_cuda_op_refuses_before_launching(emulator):
    """An INT4 group of 24 is no multiple of the tensor-core kernel's 32-k slice; the CUDA op
    checks that before it launches, and the emulator too, instead of reading past the weight."""
    n, k, spec = 16, 384, QuantSpec(4, 24, True)
    (weight_packed, scale, zero), _ = make_case(n, k, spec, torch.float16, seed=5)
    x = torch.randn(1, k).half()
    with pytest.raises(RuntimeError, match="multiples of 32"):
        emulator.mma_gemm(x, weight_packed, scale, zero, 4, 24, k)


@pytest.fixture
def emulated_cuda_ops(emulator, monkeypatch) -> list[str]:
    """`torch.ops.compress_cuda` as cuda_ops.load() provides it on an sm_80+ device, run by
    the emulator on CPU; the list names the ops called."""
    calls: list[str] = []

    def recorded(name, op):
        def call(*args):
            calls.append(name)
            return op(*args)

        return call

    ops = SimpleNamespace(
        **{
            name: SimpleNamespace(default=recorded(name, getattr(emulator, name)))
            for name in ("gemv", "mma_gemm", "dequantize")
        }
    )
    monkeypatch.setattr(torch.ops, "compress_cuda", ops)
    monkeypatch.setattr(cuda_ops, "load", lambda: True)
    monkeypatch.setattr(cuda_ops, "runs_on", lambda device: True)
    return calls


@pytest.mark.parametrize(
    ("leading", "k", "path"),
    [
        ((1,), 256, "mma"),
        ((3, 5), 256, "mma"),
        ((2, 20), 256, "mma"),
        ((5, 13), 256, "dequantize"),
        ((3, 5), 200, "gemv"),  # K = 25 words: no whole 32-k slices for the tensor cores
    ],
)
def test_cuda_dispatch_picks_the_kernel_by_rows(emulated_cuda_ops, leading, k, path):
    """compress::dequant_matmul's CUDA kernel, with the emulated ops in place of the compiled:
    tensor cores up to 64 rows (GEMV where they cannot run), dequantize + matmul above, any
    leading shape."""
    spec = QuantSpec(4, 8 if k % 32 else 64, False)
    n = 24
    (weight_packed, scale, zero), reference = make_case(n, k, spec, torch.bfloat16, seed=5)
    x = torch.randn(*leading, k, generator=torch.Generator().manual_seed(5)).bfloat16()
    got = _dequant_matmul_cuda(x, weight_packed, scale, zero, 4, spec.group_size, k)
    assert emulated_cuda_ops == [{"mma": "mma_gemm"}.get(path, path)]
    assert got.shape == (*leading, n) and got.dtype == torch.bfloat16
    expected = x.float() @ reference.t()
    assert float((got.float() - expected).norm() / expected.norm()) < REL_TOL[torch.bfloat16]


def test_cuda_path_rules():
    """The row limits and the tensor-core shape rules, without running anything."""
    path = kernels.cuda_path
    assert CUDA_GEMV_ROWS == 0  # the tensor cores take decode shapes too (see compress/kernels.py)
    assert path(1, 4, 128, 4096, mma_capable=True) == "mma"
    assert path(1, 4, 128, 4096, mma_capable=False) == "gemv"
    assert path(CUDA_GEMV_MAX_ROWS, 4, 128, 4096, mma_capable=False) == "gemv"
    assert path(CUDA_GEMV_MAX_ROWS + 1, 4, 128, 4096, mma_capable=False) == "dequantize"
    assert path(CUDA_MMA_MAX_ROWS, 8, PER_CHANNEL, 4096, mma_capable=True) == "mma"
    assert path(CUDA_MMA_MAX_ROWS + 1, 4, 128, 4096, mma_capable=True) == "dequantize"
    assert path(8, 8, PER_CHANNEL, 4104, mma_capable=True) == "gemv"  # 4104 % 16 != 0


def test_cuda_dispatch_casts_scales_to_the_activation_dtype(emulated_cuda_ops):
    """Float32 scales with FP16 activations still take the kernels, not the slow path."""
    n, k, spec = 24, 256, QuantSpec(4, 64, False)
    (weight_packed, scale, zero), reference = make_case(n, k, spec, torch.float32, seed=6)
    assert scale.dtype == torch.float32
    x = torch.randn(3, k, generator=torch.Generator().manual_seed(6)).half()
    got = _dequant_matmul_cuda(x, weight_packed, scale, zero, 4, 64, k)
    assert emulated_cuda_ops == ["mma_gemm"] and got.dtype == torch.float16
    expected = x.float() @ reference.t()
    assert float((got.float() - expected).norm() / expected.norm()) < REL_TOL[torch.float16]


def test_cuda_dispatch_keeps_cast_scales_until_they_change(emulated_cuda_ops):
    """The scales cast to the activation dtype are made once per weight, and made again after
    an in-place change to the scales (load_state_dict copies into them)."""
    n, k, spec = 24, 256, QuantSpec(4, 64, False)
    (weight_packed, scale, zero), _ = make_case(n, k, spec, torch.float32, seed=7)
    x = torch.randn(3, k, generator=torch.Generator().manual_seed(7)).half()
    first = _dequant_matmul_cuda(x, weight_packed, scale, zero, 4, 64, k)
    kept = weight_packed._compress_operands.value[0]
    assert kept.dtype == torch.float16
    torch.testing.assert_close(_dequant_matmul_cuda(x, weight_packed, scale, zero, 4, 64, k), first)
    assert weight_packed._compress_operands.value[0] is kept
    scale.mul_(2)
    doubled = _dequant_matmul_cuda(x, weight_packed, scale, zero, 4, 64, k)
    torch.testing.assert_close(doubled.float(), 2 * first.float(), rtol=2e-3, atol=1e-3)


def test_cuda_dispatch_checks_x_on_every_call(emulated_cuda_ops):
    """The weight's checks run once per state of the weight, x's on every call: a wrong K
    after the operands are cached is still the op's own error, naming the shapes."""
    n, k, spec = 24, 256, QuantSpec(4, 64, False)
    (weight_packed, scale, zero), _ = make_case(n, k, spec, torch.float32, seed=8)
    _dequant_matmul_cuda(torch.randn(1, k).half(), weight_packed, scale, zero, 4, 64, k)
    assert weight_packed._compress_operands is not None
    with pytest.raises(ValueError, match=r"x has 128 features.*x \(1, 128\)"):
        _dequant_matmul_cuda(torch.randn(1, 128).half(), weight_packed, scale, zero, 4, 64, k)
    with pytest.raises(ValueError, match="group_size 48 is not -1"):
        _dequant_matmul_cuda(torch.randn(1, k).half(), weight_packed, scale, zero, 4, 48, k)


def test_cuda_dispatch_remakes_operands_for_another_scale_tensor(emulated_cuda_ops):
    """Another scale tensor with the same version counter gets its own cast scales."""
    n, k, spec = 24, 256, QuantSpec(4, 64, False)
    (weight_packed, scale, zero), _ = make_case(n, k, spec, torch.float32, seed=9)
    x = torch.randn(3, k, generator=torch.Generator().manual_seed(9)).half()
    doubled = 2 * scale
    same_version(doubled, scale)
    first = _dequant_matmul_cuda(x, weight_packed, scale, zero, 4, 64, k)
    got = _dequant_matmul_cuda(x, weight_packed, doubled, zero, 4, 64, k)
    torch.testing.assert_close(got.float(), 2 * first.float(), rtol=2e-3, atol=1e-3)


def test_cuda_dispatch_keeps_the_pure_pytorch_path_on_a_device_the_kernels_do_not_run_on(
    emulated_cuda_ops, monkeypatch
):
    """A GPU the loaded library holds no code for (before sm_80, or a build for other GPUs:
    cuda_ops.runs_on says no) gets the pure-PyTorch product, not a failed launch. The device
    is asked once per state of the weight, and the op's checks still run."""
    asked = []
    monkeypatch.setattr(cuda_ops, "runs_on", lambda device: asked.append(device) or False)
    n, k, spec = 24, 256, QuantSpec(4, 64, False)
    (weight_packed, scale, zero), reference = make_case(n, k, spec, torch.float32, seed=10)
    x = torch.randn(3, k, generator=torch.Generator().manual_seed(10)).half()
    for _ in range(2):
        got = _dequant_matmul_cuda(x, weight_packed, scale, zero, 4, 64, k)
        assert got.shape == (3, n) and got.dtype == torch.float16
        expected = x.float() @ reference.t()
        assert float((got.float() - expected).norm() / expected.norm()) < REL_TOL[torch.float16]
    assert emulated_cuda_ops == [] and asked == [weight_packed.device]
    with pytest.raises(ValueError, match=r"x has 128 features.*x \(1, 128\)"):
        _dequant_matmul_cuda(torch.randn(1, 128).half(), weight_packed, scale, zero, 4, 64, k)
