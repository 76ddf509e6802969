"""Scoring speed on CPU: how long a quantized artifact takes to score held-out windows (what
lm-eval's loglikelihood requests and the gate's perplexity / KL do: prefill, batch 1) against
its bf16 baseline, per CPU path of `compress::dequant_matmul`.

    .venv/bin/python benchmarks/scoring.py [--seq-lens 128,512] [--windows 4]

Rows: the bf16 baseline; the artifact (GPTQ-free INT4 g64 asymmetric, round to nearest: the
path does not depend on how the integers were chosen) with the op's default dispatch (packed
kernels up to `CPU_PACKED_MAX_ROWS` rows, dequantize → GEMM above); with the packed kernels at
every row count (the dispatch before 2026-12-06); with dequantize → GEMM everywhere; and with
the default dispatch inside `dense_weights_for_scoring` (dequantized copies kept while
scoring), which the gate and `compress search` use.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from unittest import mock

import torch

import compress.kernels as kernels
import compress.stages  # noqa: F401  (registers the quantize stage)
from compress.quant.config import QuantizeConfig
from compress.registry import StageContext, handler_for

from _common import add_model_and_data_arguments, load_inputs


def seconds_per_window(model: torch.nn.Module, windows: torch.Tensor, repeats: int) -> float:
    """Median over `repeats` passes of the mean seconds per window (batch 1, no KV cache)."""
    with torch.no_grad():
        model(input_ids=windows[:1], use_cache=False)  # warm-up: repacks, allocator
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            for window in windows:
                model(input_ids=window[None], use_cache=False)
            times.append((time.perf_counter() - start) / len(windows))
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_and_data_arguments(parser)
    parser.add_argument("--seq-lens", default="128,512")
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    args.samples, args.eval_windows = 1, 1
    inputs = load_inputs(args)
    baseline = inputs.model
    artifact = load_inputs(args).model
    config = QuantizeConfig(bits=4, group_size=64, symmetric=False)
    handler_for(config).apply(artifact, config, StageContext(dtype=args.dtype))
    paths = {
        "default dispatch": dict(kernels.CPU_PACKED_MAX_ROWS),
        "packed kernels at every row count": {4: 1 << 30, 8: 1 << 30},
        "dequantize → GEMM everywhere": {4: 0, 8: 0},
    }
    out = sys.stdout
    out.write(
        f"\n{args.model} ({args.dtype}), torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; ms per window (median of {args.repeats} passes over "
        f"{args.windows} windows, batch 1)\n\n"
        "| model | CPU path | seq len | ms / window | × baseline |\n|---|---|---|---|---|\n"
    )
    for seq_len in (int(n) for n in args.seq_lens.split(",")):
        gen = torch.Generator().manual_seed(seq_len)
        vocab = baseline.config.vocab_size
        windows = torch.randint(0, vocab, (args.windows, seq_len), generator=gen)
        base = seconds_per_window(baseline, windows, args.repeats)
        out.write(f"| bf16 baseline | dense | {seq_len} | {1e3 * base:.1f} | 1.00 |\n")
        for name, limits in paths.items():
            with mock.patch.dict(kernels.CPU_PACKED_MAX_ROWS, limits):
                took = seconds_per_window(artifact, windows, args.repeats)
            out.write(f"| INT4 g64 | {name} | {seq_len} | {1e3 * took:.1f} | {took / base:.2f} |\n")
        with kernels.dense_weights_for_scoring():  # what the gate and the search score with
            took = seconds_per_window(artifact, windows, args.repeats)
        out.write(
            f"| INT4 g64 | default, dense copies while scoring (the gate) | {seq_len} | "
            f"{1e3 * took:.1f} | {took / base:.2f} |\n"
        )
        out.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
