"""Mixed precision from measured sensitivity, against uniform INT4 and an NNCF-style allocation.

    python benchmarks/search.py [--samples 4 --seq-len 256 --eval-windows 4]

Round to nearest throughout (GPTQ per candidate is still to come, issue 33). Prints:
- the wall time of measuring sensitivity, and how well the Hessian proxy ranks the candidates
  (Spearman's ρ against the measured KL);
- the Pareto front's size, and five allocations along it with their predicted KL (the sum of
  per-group KLs) against the KL measured with all their choices at once, on the calibration
  windows (additivity) and on held-out text;
- at uniform INT4 g64's predicted KL, the smallest allocation on the front; at its size, the
  lowest-KL one; and an NNCF-style allocation at that size (groups sorted by the proxy, the
  least sensitive in INT4 g64 up to the size, the rest INT8), all measured on held-out text.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from compress.evaluate.quality import BaselineLogProbs, baseline_logprobs, measure_quality
from compress.quant.config import PER_CHANNEL
from compress.search.allocate import (
    Allocation,
    Option,
    lowest_kl_within,
    pareto_front,
    smallest_within,
)
from compress.search.candidates import DEFAULT_FORMATS, Format, storage_bytes
from compress.search.sensitivity import (
    LayerGroup,
    fake_quantized,
    group_formats,
    input_hessians,
    layer_groups,
    measured_sensitivity,
    proxy_sensitivity,
    rank_correlation,
)

from _common import add_model_and_data_arguments, describe_inputs, load_inputs, write_rows

log = logging.getLogger("search")
UNIFORM = Format(4, 64, False)
INT8 = Format(8, PER_CHANNEL, True)


@dataclass
class Row:
    allocation: str
    bytes: int
    predicted_kl: float
    calibration_kl: float
    held_out_kl: float


def group_bytes(model: nn.Module, group: LayerGroup, fmt: Format) -> int:
    layers = [model.get_submodule(n) for n in group.layers]
    return sum(storage_bytes(fmt, m.out_features, m.in_features) for m in layers)


def measured_kl(
    model: nn.Module,
    groups: Sequence[LayerGroup],
    chosen: Sequence[Format],
    windows: torch.Tensor,
    baseline: BaselineLogProbs,
) -> float:
    with contextlib.ExitStack() as stack:
        for group, fmt in zip(groups, chosen, strict=True):
            stack.enter_context(fake_quantized(model, group.layers, fmt))
        return measure_quality(model, windows, baseline).kl_divergence


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_and_data_arguments(parser)
    parser.set_defaults(samples=4, seq_len=256, eval_windows=4, batch_size=2)
    parser.add_argument("--resolution", type=int, default=4096, help="front's byte buckets")
    args = parser.parse_args()
    inputs = load_inputs(args)
    model = inputs.model
    groups = layer_groups(model)
    formats = [group_formats(model, g, DEFAULT_FORMATS) for g in groups]

    start = time.perf_counter()
    measured = measured_sensitivity(model, groups, DEFAULT_FORMATS, inputs.windows, batch_size=2)
    sensitivity_s = time.perf_counter() - start
    layers = [n for g in groups for n in g.layers]
    hessians = input_hessians(model, layers, inputs.windows, batch_size=2)
    proxy = proxy_sensitivity(model, groups, DEFAULT_FORMATS, hessians)
    rho = rank_correlation(measured, proxy)

    options = [
        [Option(group_bytes(model, g, f), measured[g.name][f.name]) for f in fs]
        for g, fs in zip(groups, formats, strict=True)
    ]
    start = time.perf_counter()
    front = pareto_front(options, resolution=args.resolution)
    front_s = time.perf_counter() - start
    calibration_baseline = baseline_logprobs(model, inputs.windows)

    def row(name: str, chosen: Sequence[Format]) -> Row:
        predicted = sum(measured[g.name][f.name] for g, f in zip(groups, chosen, strict=True))
        return Row(
            name,
            sum(group_bytes(model, g, f) for g, f in zip(groups, chosen, strict=True)),
            predicted,
            measured_kl(model, groups, chosen, inputs.windows, calibration_baseline),
            measured_kl(model, groups, chosen, inputs.held_out, inputs.baseline),
        )

    def formats_of(allocation: Allocation) -> list[Format]:
        return [fs[c] for fs, c in zip(formats, allocation.choices, strict=True)]

    uniform = row("uniform int4-g64", [UNIFORM] * len(groups))
    rows = [uniform]
    same_kl = smallest_within(front, uniform.predicted_kl)
    if same_kl is not None:
        rows.append(row("front: smallest at uniform's predicted KL", formats_of(same_kl)))
    same_size = lowest_kl_within(front, uniform.bytes)
    if same_size is not None:
        rows.append(row("front: lowest KL at uniform's size", formats_of(same_size)))
    for quantile in (0.05, 0.25, 0.5, 0.75, 0.95):
        point = front[min(int(quantile * len(front)), len(front) - 1)]
        rows.append(row(f"front point at {quantile:.0%} of its length", formats_of(point)))
        if point.bytes >= uniform.bytes:
            nncf = nncf_style(model, groups, proxy, point.bytes)
            rows.append(row("  NNCF-style (INT4 g64 / INT8) at that size", nncf))

    out = sys.stdout
    out.write(f"\n{describe_inputs(args, inputs)}\n")
    out.write(
        f"{len(groups)} groups, {sum(len(f) for f in formats)} candidates; sensitivity measured "
        f"in {sensitivity_s:.1f} s; proxy rank correlation ρ = {rho:.3f}; front of "
        f"{len(front)} points in {front_s:.2f} s (buckets of {args.resolution} B)\n\n"
    )
    out.write(
        "| allocation | quantized layers (MB) | × uniform | predicted KL | measured KL "
        "(calibration) | measured KL (held out) |\n|---|---|---|---|---|---|\n"
    )
    for r in rows:
        out.write(
            f"| {r.allocation} | {r.bytes / 1e6:.2f} | {r.bytes / uniform.bytes:.3f} | "
            f"{r.predicted_kl:.4f} | {r.calibration_kl:.4f} | {r.held_out_kl:.4f} |\n"
        )
    write_rows(args.out, rows)
    return 0


def nncf_style(
    model: nn.Module, groups: Sequence[LayerGroup], proxy: dict, max_bytes: int
) -> list[Format]:
    """NNCF's ratio-based mixed precision with the ratio chosen to fit `max_bytes`: every group
    in INT8, then the least sensitive by the proxy's INT4 g64 error moved to INT4 g64, most
    sensitive last, until the total fits."""
    chosen = [INT8] * len(groups)
    total = sum(group_bytes(model, g, INT8) for g in groups)
    order = sorted(range(len(groups)), key=lambda i: proxy[groups[i].name][UNIFORM.name])
    for i in order:
        if total <= max_bytes:
            break
        total -= group_bytes(model, groups[i], INT8) - group_bytes(model, groups[i], UNIFORM)
        chosen[i] = UNIFORM
    return chosen


if __name__ == "__main__":
    raise SystemExit(main())
