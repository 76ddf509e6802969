"""CPU matmul paths for quantized Linear layers at decode shapes (M = 1): dense bf16 and fp32,
our pure-PyTorch dequantize → linear (the `reference` kernel), the op's default `packed` CPU
kernel, and torch's packed CPU ops alone (`_weight_int8pack_mm`,
`_weight_int4pack_mm_for_cpu` after a one-time repack). Correctness of each packed path is
checked against our dequantized weight before it is timed.

    .venv/bin/python benchmarks/cpu_matmul.py [--shapes 576x1536,1536x576,...] [--rows 1]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from compress.kernels import cpu_kernel, dequant_matmul, dequantize_packed
from compress.quant.config import QuantizeConfig
from compress.quant.linear import QuantLinear
from compress.quant.plan import spec_of
from compress.quant.rtn import rtn_quantize

# SmolLM2-135M (hidden 576, FFN 1536, 3 KV heads of 64) and Llama-3-8B layer shapes, K×N.
DEFAULT_SHAPES = "576x576,576x192,576x1536,1536x576,4096x4096,4096x14336,14336x4096"


def timed(fn, repeats: int = 50) -> float:
    """Median seconds of `fn()` after warm-up."""
    for _ in range(5):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def quantized(linear: torch.nn.Linear, bits: int, group: int, symmetric: bool) -> QuantLinear:
    """RTN, as the quantize stage stores it (scales in the weight's dtype)."""
    spec = spec_of(QuantizeConfig(bits=bits, group_size=group, symmetric=symmetric))
    packed = rtn_quantize(linear.weight.detach(), spec, linear.weight.dtype)
    return QuantLinear.from_packed(packed, spec, None, linear.weight.dtype)


def int4_cpu_operands(layer: QuantLinear) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(packed weight, scales-and-zeros (G, N, 2), group) for torch's int4 CPU op:
    it computes (q − 8)·s + z', so our (q − zero)·s becomes z' = (8 − zero)·s."""
    from compress.kernels import _unpacked_codes
    from compress.quant.packing import unpack_zero_points

    n, k = layer.out_features, layer.in_features
    codes = _unpacked_codes(layer.weight_packed, 4).to(torch.int32)  # (N, K)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 2)
    scale = layer.weight_scale.float()  # (N, G)
    if layer.weight_zero_point is None:
        zero = torch.full_like(scale, 8.0)
    else:
        zero = unpack_zero_points(layer.weight_zero_point, 4, n).float()
    shifted = (8 - zero) * scale
    scales_and_zeros = torch.stack((scale, shifted), dim=-1).transpose(0, 1).contiguous()
    return packed, scales_and_zeros.to(torch.bfloat16), k // scale.shape[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shapes", default=DEFAULT_SHAPES)
    parser.add_argument("--rows", type=int, default=1, help="M (tokens per call)")
    parser.add_argument("--group", type=int, default=64)
    args = parser.parse_args()
    torch.manual_seed(0)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, M = {args.rows}, "
        f"INT4 g{args.group} asymmetric; µs per call (median)\n"
    )
    print(
        "| K×N | bf16 dense | fp32 dense | INT4 reference (dequant→linear) | INT4 op (packed) "
        "| torch int4pack alone | torch int8pack alone | INT8 reference | INT8 op (packed) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for shape in args.shapes.split(","):
        k, n = (int(v) for v in shape.split("x"))
        row = measure_shape(k, n, args.rows, args.group)
        print(f"| {k}×{n} | " + " | ".join(f"{1e6 * t:.0f}" for t in row) + " |")


def relative_error(fast: torch.Tensor, reference: torch.Tensor) -> float:
    return ((fast.float() - reference).norm() / reference.norm()).item()


def measure_shape(k: int, n: int, rows: int, group: int) -> list[float]:
    """Seconds per call of each path for x (rows, K) @ W (N, K)ᵀ, after checking each packed
    path computes our dequantized weight's product."""
    dense = torch.nn.Linear(k, n, bias=False).to(torch.bfloat16)
    dense32 = torch.nn.Linear(k, n, bias=False)
    dense32.weight.data = dense.weight.data.float()
    x = torch.randn(rows, k, dtype=torch.bfloat16)
    x32 = x.float()
    q4 = quantized(dense, 4, group, symmetric=False)
    q8 = quantized(dense, 8, -1, symmetric=True)

    packed, scales_and_zeros, group_size = int4_cpu_operands(q4)
    w4 = dequantize_packed(
        q4.weight_packed, q4.weight_scale, q4.weight_zero_point, 4, group, k, torch.float32
    )
    int4_cpu = torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group_size, scales_and_zeros)
    error = relative_error(int4_cpu, x32 @ w4.T)
    assert error < 2e-2, f"{k}×{n}: torch int4pack differs from our weight ({error:.3g})"

    codes8 = (q8.weight_packed.view(torch.uint8) ^ 0x80).view(torch.int8).view(n, k)
    scale8 = q8.weight_scale.view(n).to(torch.bfloat16)
    w8 = dequantize_packed(q8.weight_packed, q8.weight_scale, None, 8, -1, k, torch.float32)
    error = relative_error(torch.ops.aten._weight_int8pack_mm(x, codes8, scale8), x32 @ w8.T)
    assert error < 2e-2, f"{k}×{n}: torch int8pack differs from our weight ({error:.3g})"

    def ours(layer: QuantLinear, bits: int, group_size: int, kernel: str):
        zero = layer.weight_zero_point

        def call() -> torch.Tensor:
            with cpu_kernel(kernel):
                return dequant_matmul(
                    x, layer.weight_packed, layer.weight_scale, zero, bits, group_size, k
                )

        return call

    return [
        timed(lambda: dense(x)),
        timed(lambda: dense32(x32)),
        timed(ours(q4, 4, group, "reference")),
        timed(ours(q4, 4, group, "packed")),
        timed(
            lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(
                x, packed, group_size, scales_and_zeros
            )
        ),
        timed(lambda: torch.ops.aten._weight_int8pack_mm(x, codes8, scale8)),
        timed(ours(q8, 8, -1, "reference")),
        timed(ours(q8, 8, -1, "packed")),
    ]


if __name__ == "__main__":
    with torch.inference_mode():
        main()
