"""`compress search` on the demo model against uniform GPTQ INT4 g64 and an NNCF-style
allocation, every artifact built with the recipe's own quantize stage (GPTQ).

    .venv/bin/python benchmarks/search.py [--recipe recipes/search-int4.yaml]   (from the root)

Reuses the sensitivity table `compress search` cached for the same model, windows and formats
(else measures it). Prints:
- sensitivity: method, dtype, wall time, and the Hessian proxy's rank correlation;
- additivity: for 5 allocations along the front, the predicted KL (sum of per-group KLs)
  against the KL of all their choices at once, each group rounded as in the table, in the
  sensitivity dtype on the sensitivity windows;
- the targets, on the gate's held-out windows (what `compress run` judges): uniform INT4 g64;
  the front's lowest predicted KL at its size; an NNCF-style allocation at that size (groups
  sorted by the proxy's INT4 g64 error, the least sensitive in INT4 g64, the rest INT8, filled
  to the size); and the smallest front allocation whose KL is within uniform's, found by the
  search's own bisection;
- the wall time of each build and of the whole run.
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

from compress.evaluate.quality import baseline_logprobs, measure_quality
from compress.quant.config import PER_CHANNEL, QuantizeConfig
from compress.recipe import load_recipe
from compress.search.allocate import lowest_kl_within
from compress.search.candidates import KEEP_16, Format
from compress.search.executor import LocalExecutor
from compress.search.procedure import Probe, predicted_guide, smallest_passing, walk_front
from compress.search.run import (
    SENSITIVITY_CACHE,
    Sensitivity,
    allocation_rounder,
    allocation_stages,
    build_candidate,
    cached_sensitivity,
    chosen_formats,
    front_of,
    group_bytes,
    load_inputs,
    search_dir,
    sensitivity_key,
)
from compress.search.sensitivity import Rounder, fake_quantized, float32_copy, group_hessians

log = logging.getLogger("search")
UNIFORM = Format(4, 64, False)
INT8 = Format(8, PER_CHANNEL, True)


@dataclass
class Built:
    allocation: str
    bytes: int
    predicted_kl: float
    held_out_kl: float
    seconds: float


def fake_quantized_kl(
    model: nn.Module,
    table: Sensitivity,
    formats: Sequence[Format],
    windows: torch.Tensor,
    rounder: Rounder,
) -> float:
    """KL with every group rounded to its format at once, against the model itself."""
    baseline = baseline_logprobs(model, windows, batch_size=2)
    with contextlib.ExitStack() as stack:
        for group, fmt in zip(table.groups, formats, strict=True):
            stack.enter_context(fake_quantized(model, group.layers, fmt, rounder))
        return measure_quality(model, windows, baseline).kl_divergence


def nncf_style(model: nn.Module, table: Sensitivity, max_bytes: int) -> list[Format]:
    """NNCF's ratio-based mixed precision with the ratio chosen to fit `max_bytes`: every group
    in INT8, then the decoder's least sensitive by the proxy's INT4 g64 error moved to INT4 g64,
    most sensitive last, while the total is over the size."""
    groups = table.groups
    chosen = [INT8] * len(groups)  # the output layer stays INT8, NNCF's backup precision
    total = sum(group_bytes(model, g, INT8) for g in groups)
    decoder = [i for i, g in enumerate(groups) if not g.output]
    order = sorted(decoder, key=lambda i: table.proxy[groups[i].name][UNIFORM.name])
    for i in order:
        if total <= max_bytes:
            break
        total -= group_bytes(model, groups[i], INT8) - group_bytes(model, groups[i], UNIFORM)
        chosen[i] = UNIFORM
    return chosen


def predicted(table: Sensitivity, formats: Sequence[Format]) -> float:
    return sum(table.measured[g.name][f.name] for g, f in zip(table.groups, formats, strict=True))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="recipes/search-int4.yaml")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    started = time.perf_counter()
    recipe = load_recipe(args.recipe)
    config = recipe.search
    assert config is not None, f"{args.recipe} has no search section"
    template = recipe.stages[0]
    assert isinstance(template, QuantizeConfig)
    inputs = load_inputs(recipe, config)
    model = inputs.model
    table = cached_sensitivity(
        model,
        inputs.sensitivity_windows,
        recipe,
        LocalExecutor(),
        sensitivity_key(recipe, inputs, config),
        search_dir(recipe) / SENSITIVITY_CACHE,
        resume=True,
        batch_size=2,
    )
    front = front_of(model, table, config.resolution)
    held_out = inputs.prepared.quality_windows
    assert held_out is not None
    baseline = baseline_logprobs(model, held_out, batch_size=recipe.eval.batch_size)

    def build(name: str, formats: Sequence[Format]) -> Built:
        start = time.perf_counter()
        stages = allocation_stages(template, table.groups, formats)
        candidate = build_candidate(model, stages, recipe, inputs.prepared.calibration)
        kl = measure_quality(candidate, held_out, baseline).kl_divergence
        size = sum(group_bytes(model, g, f) for g, f in zip(table.groups, formats, strict=True))
        return Built(name, size, predicted(table, formats), kl, time.perf_counter() - start)

    # Additivity, in the sensitivity dtype on the sensitivity windows.
    subject = float32_copy(model) if config.sensitivity_dtype == "float32" else model
    hessians = group_hessians(subject, table.groups, inputs.sensitivity_windows, batch_size=2)
    rounder = allocation_rounder(recipe, table.groups, hessians)
    additivity = []
    for quantile in (0.05, 0.25, 0.5, 0.75, 0.95):
        point = front[min(int(quantile * len(front)), len(front) - 1)]
        formats = chosen_formats(table, point)
        measured = fake_quantized_kl(subject, table, formats, inputs.sensitivity_windows, rounder)
        additivity.append((quantile, point, measured))
    del subject, hessians

    # The demo recipe (int4-group.yaml): decoder INT4 g64, the output layer kept 16-bit.
    uniform = build(
        "uniform int4-g64 (GPTQ; head 16-bit)",
        [KEEP_16 if g.output else UNIFORM for g in table.groups],
    )
    rows = [uniform]
    same_size = lowest_kl_within(front, uniform.bytes)
    if same_size is not None:
        rows.append(
            build("front: lowest predicted KL at uniform's size", chosen_formats(table, same_size))
        )
    rows.append(
        build(
            "NNCF-style (INT4 g64 / INT8) at uniform's size",
            nncf_style(model, table, uniform.bytes),
        )
    )

    tried: dict[int, Built] = {}

    def within_uniform(index: int) -> Probe:
        tried[index] = build(f"front point {index}", chosen_formats(table, front[index]))
        kl = tried[index].held_out_kl
        return Probe(index, kl <= uniform.held_out_kl, kl)

    first = front.index(same_size) if same_size is not None else len(front) // 2
    probes = walk_front(
        len(front),
        first,
        lambda xs: [within_uniform(i) for i in xs],
        config.max_candidates,
        propose=predicted_guide([a.kl for a in front], uniform.held_out_kl),
    )
    smallest = smallest_passing(probes)
    if smallest is not None:
        best = tried[smallest]
        rows.append(
            Built(
                "search: smallest front point within uniform's KL",
                best.bytes,
                best.predicted_kl,
                best.held_out_kl,
                best.seconds,
            )
        )

    out = sys.stdout
    out.write(
        f"\n{recipe.model.source} ({recipe.dtype}); {len(table.groups)} layer groups, formats "
        f"{', '.join(config.formats)}; sensitivity {config.sensitivity} in "
        f"{config.sensitivity_dtype}, {table.seconds:.0f} s (cached or measured), proxy rank "
        f"correlation ρ = {table.rank_correlation:.3f}; front of {len(front)} allocations; "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads\n\n"
        "Additivity (round to nearest, sensitivity windows):\n\n"
        "| front point | quantized layers (MB) | predicted KL | measured KL | measured / "
        "predicted |\n|---|---|---|---|---|\n"
    )
    for quantile, point, measured in additivity:
        out.write(
            f"| {quantile:.0%} of the front | {point.bytes / 1e6:.2f} | {point.kl:.4f} | "
            f"{measured:.4f} | {measured / point.kl if point.kl else float('nan'):.2f} |\n"
        )
    out.write(
        f"\nBuilt with GPTQ as the recipe says, KL on the gate's {held_out.shape[0]} held-out "
        f"windows of {held_out.shape[1]} tokens:\n\n"
        "| allocation | quantized layers (MB) | × uniform size | predicted KL | KL (held out) "
        "| × uniform KL | build + judge (s) |\n|---|---|---|---|---|---|---|\n"
    )
    for r in rows:
        out.write(
            f"| {r.allocation} | {r.bytes / 1e6:.2f} | {r.bytes / uniform.bytes:.3f} | "
            f"{r.predicted_kl:.4f} | {r.held_out_kl:.4f} | "
            f"{r.held_out_kl / uniform.held_out_kl:.2f} | {r.seconds:.0f} |\n"
        )
    out.write("\nBisection probes (front index → KL held out, within uniform's?):\n\n")
    for probe in probes:
        b = tried[probe.index]
        out.write(
            f"- {probe.index}: {b.bytes / 1e6:.2f} MB, KL {b.held_out_kl:.4f}, "
            f"{'yes' if probe.passed else 'no'}\n"
        )
    out.write(f"\nwall time {time.perf_counter() - started:.0f} s\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
