"""Host time per call of a quantized Linear at a decode shape: what eager decoding pays per
layer and step besides the kernel itself (benchmarks/kernel.py times the kernels alone, in
CUDA graphs, where none of this is paid).

Rows, each a median over `--repeats` rounds of `--calls` back-to-back calls under no_grad:
- `F.linear` on a dense weight of the same shape: what a dense model pays per layer.
- `QuantLinear`: our layer's whole forward on the device (`compress::dequant_matmul`'s
  dispatch, our Python, and on CUDA the kernel's launch; on the CPU, torch's packed int4
  matmul runs too, small at the default 256 × 256).
- Two registrations of a trivial op (it returns its input): `torch.library.custom_op`, and
  `torch.library.Library` with an implementation per dispatch key, the way compress/kernels.py
  registers the op. The difference is what the registration alone costs per call.
- Without a GPU, `CUDA path, stand-in kernels`: `compress::dequant_matmul`'s CUDA
  implementation (`_dequant_matmul_cuda`) on CPU tensors, with `torch.ops.compress_cuda`
  replaced by ops that return a preallocated output. That is our own Python on the CUDA path,
  measurable here; a GPU run replaces it with the `QuantLinear` row on CUDA.

On CUDA the calls are not synchronized one by one: at this size the device finishes each
kernel before the host has issued the next, so the host's time per call is what is measured.

    .venv/bin/python benchmarks/dispatch.py [--features 256] [--bits 4 --group-size 128]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import SimpleNamespace

import torch

from compress import cuda_ops, kernels
from compress.quant.config import QuantizeConfig
from compress.quant.linear import QuantLinear
from compress.quant.plan import spec_of
from compress.quant.rtn import rtn_quantize


def host_us_per_call(fn: Callable[[], object], calls: int, repeats: int) -> float:
    """Median over `repeats` rounds of the host's microseconds per call of `fn`."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(calls // 10 + 1):
        fn()
    rounds = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        sync()
        rounds.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(rounds)


# compress::dequant_matmul's schema, for the trivial ops.
SCHEMA = (
    "(Tensor x, Tensor weight_packed, Tensor scale, Tensor? zero_point, int bits, "
    "int group_size, int in_features) -> Tensor"
)
_LIBRARY = torch.library.Library("compress_bench", "FRAGMENT")


def _copy_of_x(x: torch.Tensor, *packed_args: object) -> torch.Tensor:
    return x.clone()


def trivial_ops() -> dict[str, Callable[..., torch.Tensor]]:
    """A do-nothing op with compress::dequant_matmul's schema, under each registration."""
    torch.library.custom_op("compress_bench::by_custom_op", mutates_args=(), schema=SCHEMA)(
        _copy_of_x
    )
    _LIBRARY.define("by_library" + SCHEMA)
    for key in ("CompositeExplicitAutograd", "CPU", "CUDA"):
        _LIBRARY.impl("by_library", _copy_of_x, key)
    return {
        "custom_op": torch.ops.compress_bench.by_custom_op.default,
        "Library": torch.ops.compress_bench.by_library.default,
    }


@contextmanager
def stand_in_cuda_kernels(output: torch.Tensor) -> Iterator[None]:
    """torch.ops.compress_cuda as it is after cuda_ops.load() on an sm_80+ device, each op
    returning `output` at once."""

    def kernel(*args: object) -> torch.Tensor:
        return output

    kernel.default = kernel  # called as an op (torch.ops.ns.op) or as its overload (.default)
    saved = (getattr(torch.ops, "compress_cuda", None), cuda_ops.load, cuda_ops.runs_on)
    torch.ops.compress_cuda = SimpleNamespace(gemv=kernel, mma_gemm=kernel, dequantize=kernel)
    cuda_ops.load, cuda_ops.runs_on = (lambda: True), (lambda device: True)
    try:
        yield
    finally:
        torch.ops.compress_cuda, cuda_ops.load, cuda_ops.runs_on = saved


def activation_dtype(args: argparse.Namespace) -> torch.dtype:
    """float16 on CUDA, bfloat16 on the CPU (torch's packed CPU matmul path), unless named."""
    return getattr(torch, args.dtype or ("float16" if torch.cuda.is_available() else "bfloat16"))


def measure(args: argparse.Namespace) -> list[tuple[str, float, str]]:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = activation_dtype(args)
    features = args.features
    config = QuantizeConfig(bits=args.bits, group_size=args.group_size, symmetric=True)
    spec = spec_of(config)
    weight = torch.randn(features, features) * 0.02
    layer = QuantLinear.from_packed(rtn_quantize(weight, spec, dtype), spec, None, dtype)
    layer = layer.to(device)
    dense = weight.to(device, dtype)
    x = torch.randn(1, 1, features, device=device, dtype=dtype)
    timing = (args.calls, args.repeats)
    op_args = (x, *layer._packed_args())
    rows = [
        ("F.linear", host_us_per_call(lambda: torch.nn.functional.linear(x, dense), *timing),
         f"dense {device}"),
        ("QuantLinear", host_us_per_call(lambda: layer(x), *timing), f"whole forward, {device}"),
    ]  # fmt: skip
    for name, op in trivial_ops().items():
        rows.append(
            (f"trivial op, {name}", host_us_per_call(lambda op=op: op(*op_args), *timing),
             "registration alone")
        )  # fmt: skip
    if device == "cpu":
        output = torch.empty(1, 1, features, dtype=dtype)
        with stand_in_cuda_kernels(output):
            cuda_python = host_us_per_call(lambda: kernels._dequant_matmul_cuda(*op_args), *timing)
        rows.append(("CUDA path, stand-in kernels", cuda_python, "our Python on the CUDA path"))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--features", type=int, default=256, help="K = N of the layer")
    parser.add_argument("--bits", type=int, default=4, choices=[4, 8])
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument(
        "--dtype", choices=["float16", "bfloat16"], help="default: float16 on CUDA, else bfloat16"
    )
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    with torch.no_grad():
        rows = measure(args)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(
        f"Host µs per call, M = 1, K = N = {args.features}, INT{args.bits} g{args.group_size}, "
        f"{activation_dtype(args)}; {device}, torch {torch.__version__}, no_grad\n"
    )
    print("| call | µs per call | measures |")
    print("|---|---:|---|")
    for name, us, what in rows:
        print(f"| {name} | {us:.2f} | {what} |")


if __name__ == "__main__":
    main()
