"""The CUDA kernels behind `compress::dequant_matmul` against dequantize-then-matmul in float32.

Skipped without a GPU (they need one to run at all). Every case draws fresh random weights
and activations (never zeros), and the output buffer is poisoned with NaN before each call
through the raw op, so a kernel that skips rows or columns cannot pass on stale memory.
"""

from __future__ import annotations

import gc
import itertools
import time

import pytest
import torch

from compress import cuda_ops
from compress.kernels import CUDA_GEMV_MAX_ROWS, CUDA_MMA_MAX_ROWS
from compress.quant.packing import PackedWeight
from compress.quant.primitives import QuantSpec
from tests.kernels.cases import MORE_SCHEMES, SCHEMES, packed_case, same_version

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available(),
        reason="needs a CUDA device to run the cuda_ext kernels (none here)",
    ),
]

OP = torch.ops.compress.dequant_matmul
ROWS = (1, 2, 3, 7, 16, 33, 64)
# (N, K): Llama-3-8B projections, the demo model's 576, and odd multiples of the group size.
SHAPES = [(4096, 4096), (1024, 4096), (4096, 14336 // 4), (576, 576), (96, 32 * 7), (160, 64 * 5)]
# Relative Frobenius error against float32: the activations and outputs are fp16/bf16 (8 or
# 11 significant bits), accumulation is float32.
REL_TOL = {torch.float16: 2e-3, torch.bfloat16: 1e-2}


def _on_gpu(packed: PackedWeight) -> tuple:
    zero = packed.weight_zero_point
    return (
        packed.weight_packed.cuda(),
        packed.weight_scale.cuda(),
        None if zero is None else zero.cuda(),
    )


def assert_op_matches_reference_at_every_m(spec: QuantSpec, n: int, k: int, dtype) -> None:
    """compress::dequant_matmul on a fresh (n, k) weight, at every M of ROWS, within the
    dtype's tolerance of dequantize-then-matmul in float32."""
    packed, reference = packed_case(n, k, spec, dtype, seed=n + k)
    weight_packed, scale, zero = _on_gpu(packed)
    for m in ROWS:
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(dtype)
        expected = x.float() @ reference.t()
        got = OP(x.cuda(), weight_packed, scale, zero, spec.bits, spec.group_size, k).float().cpu()
        assert torch.isfinite(got).all(), m
        error = (got - expected).norm() / expected.norm()
        assert error < REL_TOL[dtype], (m, float(error))


@pytest.fixture(scope="module", autouse=True)
def kernels_built():
    assert cuda_ops.load(), "cuda_ext kernels failed to build or load (see the log)"


def test_every_visible_device_runs_the_kernels_machine_code():
    """The library holds code each sm_80+ device runs, and says which: of the device's major
    architecture and at most its own (80 or 86 on an 8.6 GPU, 90 on an H100). A device
    before sm_80 runs none. cuda_ops.runs_on agrees."""
    for index in range(torch.cuda.device_count()):
        major, minor = torch.cuda.get_device_capability(index)
        with torch.cuda.device(index):
            architecture = torch.ops.compress_cuda.kernel_architecture()
        if (major, minor) < (8, 0):
            assert architecture == 0 and not cuda_ops.runs_on(torch.device("cuda", index))
            continue
        assert architecture // 10 == major and architecture <= 10 * major + minor, architecture
        assert cuda_ops.runs_on(torch.device("cuda", index))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "spec", SCHEMES, ids=lambda s: f"int{s.bits}-g{s.group_size}-{s.symmetric}"
)
@pytest.mark.parametrize(("n", "k"), SHAPES)
def test_matches_float32_reference(n, k, spec, dtype):
    if not spec.divides(k):
        pytest.skip(f"group {spec.group_size} does not divide K={k}")
    assert_op_matches_reference_at_every_m(spec, n, k, dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    ("spec", "n", "k"),
    MORE_SCHEMES,
    ids=lambda v: f"int{v.bits}-g{v.group_size}-{v.symmetric}" if isinstance(v, QuantSpec) else v,
)
def test_other_group_sizes_match_float32_reference(spec, n, k, dtype):
    """The group sizes SCHEMES leaves out, through the op at every M: groups shorter than a
    tensor-core slice take the GEMV up to 16 rows and dequantize + cuBLAS above."""
    assert_op_matches_reference_at_every_m(spec, n, k, dtype)


@pytest.mark.parametrize(
    ("op", "rows", "dtype"),
    [
        ("gemv", range(1, CUDA_GEMV_MAX_ROWS + 1), torch.float16),
        ("mma_gemm", (1, 5, 16, 17, 40, CUDA_MMA_MAX_ROWS), torch.bfloat16),
    ],
)
def test_raw_kernel_writes_every_output(op, rows, dtype):
    n, k, spec = 320, 1024, QuantSpec(4, 128, False)
    packed, reference = packed_case(n, k, spec, dtype, seed=1)
    weight_packed, scale, zero = _on_gpu(packed)
    for m in rows:
        x = torch.randn(m, k, device="cuda", dtype=dtype)
        torch.cuda.empty_cache()
        poison = torch.full((m, n), float("nan"), device="cuda", dtype=dtype)
        del poison  # freed memory the kernel's output is likely to reuse
        out = getattr(torch.ops.compress_cuda, op)(x, weight_packed, scale, zero, 4, 128, k)
        assert torch.isfinite(out).all(), m
        expected = x.float().cpu() @ reference.t()
        assert (out.float().cpu() - expected).norm() / expected.norm() < REL_TOL[dtype], m


@pytest.mark.parametrize("op", ["gemv", "mma_gemm"])
def test_raw_kernels_take_leading_dimensions(op):
    """x (B, T, K) → (B, T, N), the rows flattened by the op itself (not by a Python reshape
    per call), and a non-contiguous x copied first."""
    n, k, spec = 192, 512, QuantSpec(4, 128, False)
    packed, reference = packed_case(n, k, spec, torch.float16, seed=7)
    weight_packed, scale, zero = _on_gpu(packed)
    x = torch.randn(2, 3, k, device="cuda", dtype=torch.float16)
    for batch in (x, x.transpose(0, 1)):
        out = getattr(torch.ops.compress_cuda, op)(batch, weight_packed, scale, zero, 4, 128, k)
        assert out.shape == (*batch.shape[:-1], n)
        expected = batch.float().cpu() @ reference.t()
        assert (out.float().cpu() - expected).norm() / expected.norm() < REL_TOL[torch.float16]


def test_op_follows_in_place_changes_to_the_scales():
    """The CUDA path keeps the scales cast to the activation dtype with the weight; a copy_
    into the scales (load_state_dict does one) must reach the next call."""
    n, k, spec = 128, 256, QuantSpec(4, 64, False)
    packed, _ = packed_case(n, k, spec, torch.float32, seed=8)
    weight_packed, scale, zero = _on_gpu(packed)
    x = torch.randn(4, k, device="cuda", dtype=torch.float16)
    first = OP(x, weight_packed, scale, zero, 4, 64, k)
    scale.mul_(2)
    second = OP(x, weight_packed, scale, zero, 4, 64, k)
    torch.testing.assert_close(second, 2 * first, rtol=2e-3, atol=1e-3)


def test_split_k_gives_the_same_bits_on_every_stream_and_in_graphs():
    """At M = 1 a 4096-row weight splits K across blocks, the last split's block adding the
    partial sums with counters kept per stream: every call, on another stream and replayed
    from a CUDA graph, gives the same bits (the sum runs in split order)."""
    n, k, spec = 4096, 4096, QuantSpec(4, 128, False)
    packed, reference = packed_case(n, k, spec, torch.float16, seed=10)
    args = (*_on_gpu(packed), 4, 128, k)
    x = torch.randn(1, k, device="cuda", dtype=torch.float16)
    first = torch.ops.compress_cuda.mma_gemm(x, *args)
    expected = x.float().cpu() @ reference.t()
    assert (first.float().cpu() - expected).norm() / expected.norm() < REL_TOL[torch.float16]
    for _ in range(3):
        assert torch.equal(torch.ops.compress_cuda.mma_gemm(x, *args), first)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        on_side = torch.ops.compress_cuda.mma_gemm(x, *args)
    torch.cuda.current_stream().wait_stream(side)
    assert torch.equal(on_side, first)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        replayed = torch.ops.compress_cuda.mma_gemm(x, *args)
    for _ in range(3):
        replayed.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(replayed, first)


def _split_k_in_kernel_cases(count: int) -> list[tuple[torch.Tensor, tuple, torch.Tensor]]:
    """`count` (x, mma_gemm's weight arguments, its eager output) at M = 1 on 4096 × 4096 INT4
    g128 weights, whose K the plan splits with the last block adding the sums."""
    n, k, spec = 4096, 4096, QuantSpec(4, 128, False)
    assert torch.ops.compress_cuda.mma_plan(1, n, k, 128, 4, False)[5] == 1, "no in-kernel sum"
    cases = []
    for seed in range(count):
        packed, _ = packed_case(n, k, spec, torch.float16, seed=20 + seed)
        args = (*_on_gpu(packed), 4, 128, k)
        x = torch.randn(1, k, device="cuda", dtype=torch.float16)
        cases.append((x, args, torch.ops.compress_cuda.mma_gemm(x, *args)))
    return cases


def _captured(
    x: torch.Tensor, args: tuple, stream: torch.cuda.Stream
) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
    """mma_gemm recorded on `stream` (as torch.cuda.graph records every graph on one stream,
    without its garbage collection and cache emptying per capture)."""
    graph = torch.cuda.CUDAGraph()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        graph.capture_begin()
        out = torch.ops.compress_cuda.mma_gemm(x, *args)
        graph.capture_end()
    torch.cuda.current_stream().wait_stream(stream)
    return graph, out


def _sets_held_by_graphs() -> int:
    return torch.ops.compress_cuda.split_k_counter_sets()[1]


def _settled_sets_held_by_graphs() -> int:
    """The sets held by graphs once no destroyed graph's hand-back is pending: CUDA runs them
    on its own thread, after the graph's launches, so the count may still fall for a moment
    after an earlier test's graphs are freed."""
    gc.collect()
    held, deadline = -1, time.monotonic() + 5
    while time.monotonic() < deadline:
        torch.cuda.synchronize()
        time.sleep(0.02)
        now = _sets_held_by_graphs()
        if now == held:
            break
        held = now
    return held


def test_graphs_captured_on_one_stream_replay_at_once_on_two_streams():
    """Two graphs recorded on one capture stream hold split-K counters of their own: replayed
    at the same time on two streams, each gives its eager bits every time (shared counters
    would let a block add the sums before every split of the other graph's launch is
    written, and leave counts behind)."""
    cases = _split_k_in_kernel_cases(2)
    held = _settled_sets_held_by_graphs()
    capture_stream = torch.cuda.Stream()
    captured = [_captured(x, args, capture_stream) for x, args, _ in cases]
    assert _sets_held_by_graphs() == held + 2
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    for _ in range(20):
        for _, out in captured:
            out.fill_(float("nan"))
        for stream, (graph, _) in zip(streams, captured, strict=True):
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(8):
                    graph.replay()
        for stream in streams:
            torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        for (_, out), (_, _, expected) in zip(captured, cases, strict=True):
            assert torch.equal(out, expected)


def test_destroyed_graphs_hand_their_split_k_counters_back():
    """A graph's counter set goes back to the pool when the graph is destroyed (CUDA runs the
    hand-back on its own thread once the graph and its launches are done), so capturing more
    graphs over a process's life than there are sets keeps the sums in the kernel."""
    x, args, expected = _split_k_in_kernel_cases(1)[0]
    held = _settled_sets_held_by_graphs()
    sets = sum(torch.ops.compress_cuda.split_k_counter_sets())
    capture_stream = torch.cuda.Stream()
    for _ in range(sets + 8):
        graph, out = _captured(x, args, capture_stream)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, expected)
        assert _sets_held_by_graphs() == held + 1, "the capture got no counters"
        del graph, out
        deadline = time.monotonic() + 5
        while _sets_held_by_graphs() > held and time.monotonic() < deadline:
            torch.cuda.synchronize()  # CUDA may defer the hand-back to its next sync
            time.sleep(0.001)
        assert _sets_held_by_graphs() == held


# (K, N) of Llama-3-8B's projections: their grids at M 17–64 needed the one-wave cap.
LLAMA_SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096), (4096, 1024)]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_tensor_core_grid_fits_one_wave(dtype):
    """The occupancy the op asks CUDA for is that of a real kernel (at least one block per
    SM, at most the 16 of 128 threads an SM holds), and splitting K keeps the grid within one
    wave of it on this device."""
    sm_count = torch.cuda.get_device_properties(0).multi_processor_count
    for (k, n), m in itertools.product(LLAMA_SHAPES, (1, 16, 17, 33, 64)):
        _, _, blocks_n, splits, per_sm, _ = torch.ops.compress_cuda.mma_plan(
            m, n, k, 128, 4, dtype == torch.bfloat16
        )
        assert 1 <= per_sm <= 16, (k, n, m, per_sm)
        assert splits >= 1 and blocks_n * splits <= per_sm * sm_count, (k, n, m, splits)


@pytest.mark.parametrize("m", [1, 7, 33])
def test_forced_splits_match_the_reference(m):
    """benchmarks/kernel.py --sweep-splits times mma_gemm at splits the plan did not pick, each
    with the splits added by the last block and by a second kernel: each computes the
    product, both sums give the same bits (split order), mma_plan reports the split that runs
    (at most one per chunk of K), and splits outside [0, 65535] are refused."""
    n, k, spec = 1024, 4096, QuantSpec(4, 128, False)
    packed, reference = packed_case(n, k, spec, torch.float16, seed=12)
    args = (*_on_gpu(packed), 4, 128, k)
    x = torch.randn(m, k, device="cuda", dtype=torch.float16)
    expected = x.float().cpu() @ reference.t()
    chunks = k // 128
    for asked in (1, 3, 8, chunks, 2 * chunks):
        ran = torch.ops.compress_cuda.mma_plan(m, n, k, 128, 4, False, asked)[3]
        assert ran == min(asked, chunks), (asked, ran)  # every count here leaves none empty
        out = torch.ops.compress_cuda.mma_gemm(x, *args, asked)
        error = (out.float().cpu() - expected).norm() / expected.norm()
        assert error < REL_TOL[torch.float16], (m, asked, float(error))
        if ran > 1:
            in_kernel = torch.ops.compress_cuda.mma_gemm(x, *args, asked, True)
            second = torch.ops.compress_cuda.mma_gemm(x, *args, asked, False)
            assert torch.equal(in_kernel, second) and torch.equal(in_kernel, out), (m, asked)
    with pytest.raises(RuntimeError, match=r"splits must be 0"):
        torch.ops.compress_cuda.mma_gemm(x, *args, -1)


def test_op_takes_another_scale_tensor_of_the_same_version():
    """Another scale tensor with the same version counter gets its own cast scales."""
    n, k, spec = 128, 256, QuantSpec(4, 64, False)
    packed, _ = packed_case(n, k, spec, torch.float32, seed=9)
    weight_packed, scale, zero = _on_gpu(packed)
    doubled = 2 * scale
    same_version(doubled, scale)
    x = torch.randn(4, k, device="cuda", dtype=torch.float16)
    first = OP(x, weight_packed, scale, zero, 4, 64, k)
    second = OP(x, weight_packed, doubled, zero, 4, 64, k)
    torch.testing.assert_close(second, 2 * first, rtol=2e-3, atol=1e-3)


def test_gemv_takes_unaligned_activations():
    """The kernel reads x as 16-byte vectors; the op copies a view that is not aligned."""
    n, k, spec = 64, 256, QuantSpec(4, 128, True)
    packed, reference = packed_case(n, k, spec, torch.float16, seed=5)
    weight_packed, scale, zero = _on_gpu(packed)
    buffer = torch.randn(k + 8, device="cuda", dtype=torch.float16)
    x = buffer[1 : 1 + k].view(1, k)  # 2 bytes past an aligned address
    out = torch.ops.compress_cuda.gemv(x, weight_packed, scale, zero, 4, 128, k)
    expected = x.float().cpu() @ reference.t()
    assert (out.float().cpu() - expected).norm() / expected.norm() < 2e-3


def test_dequantize_kernel_is_exact():
    n, k, spec = 256, 576, QuantSpec(4, 64, False)
    packed, reference = packed_case(n, k, spec, torch.bfloat16, seed=2)
    weight_packed, scale, zero = _on_gpu(packed)
    weight = torch.ops.compress_cuda.dequantize(weight_packed, scale, zero, 4, 64, k)
    # (q − z)·s in float32 rounded once to bf16: what the CPU path computes in bf16.
    assert torch.equal(weight.cpu(), reference.to(torch.bfloat16))


def test_errors_name_the_problem():
    n, k, spec = 64, 128, QuantSpec(4, 32, True)
    packed, _ = packed_case(n, k, spec, torch.float16, seed=3)
    weight_packed, scale, _ = _on_gpu(packed)
    x = torch.randn(2, k, device="cuda", dtype=torch.float16)
    with pytest.raises(ValueError, match="features"):
        OP(
            torch.randn(2, k + 32, device="cuda", dtype=torch.float16),
            weight_packed,
            scale,
            None,
            4,
            32,
            k,
        )
    with pytest.raises(RuntimeError, match="must be on"):
        torch.ops.compress_cuda.gemv(x.cpu(), weight_packed, scale, None, 4, 32, k)
    with pytest.raises(RuntimeError, match="scale is"):
        torch.ops.compress_cuda.gemv(x.to(torch.bfloat16), weight_packed, scale, None, 4, 32, k)
    with pytest.raises(RuntimeError, match="group_size"):
        torch.ops.compress_cuda.gemv(x, weight_packed, scale, None, 4, 48, k)
    with pytest.raises(RuntimeError, match="multiples of 32"):  # K = 24: three words
        codes = torch.randint(0, 2**31 - 1, (n, 3), dtype=torch.int32, device="cuda")
        scales = torch.ones(n, 3, dtype=torch.float16, device="cuda")
        x24 = torch.randn(2, 24, device="cuda", dtype=torch.float16)
        torch.ops.compress_cuda.mma_gemm(x24, codes, scales, None, 4, 8, 24)
    with pytest.raises(RuntimeError, match=r"M must be in \[1, 64\]"):
        many = torch.randn(65, k, device="cuda", dtype=torch.float16)
        torch.ops.compress_cuda.mma_gemm(many, weight_packed, scale, None, 4, 32, k)
