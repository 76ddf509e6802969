"""Structured pruning quality and cost: criterion × target on one model, no recovery training.

Each row prunes a copy of the source model in memory and measures it against the unpruned
baseline on the same held-out windows: parameters, perplexity, KL(baseline ‖ pruned) per
token, top-1 agreement, and time (the row's share: slicing + scoring from statistics gathered
once per criterion; the calibration pass itself is timed separately and printed above the
table).

Targets: FFN channels 10 / 25 / 40 % removed (kept channels rounded to the nearest multiple of
32, so the exact share is in the shape column), one query head per KV group, and 2 and 4 whole
layers (by the cosine layer score, and, as the naive reference, the layers just before the
final one).

    .venv/bin/python benchmarks/pruning.py
    .venv/bin/python benchmarks/pruning.py --criteria activation,taylor --targets ffn25

Target: at equal size, activation-aware or Taylor scores give a lower KL divergence than
magnitude.
"""

from __future__ import annotations

import argparse
import copy
import gc
import logging
import sys
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from compress.evaluate.quality import BaselineLogProbs, measure_quality
from compress.models import count_params
from compress.prune.config import PruneConfig
from compress.prune.stage import prune_with_statistics
from compress.prune.statistics import CalibrationStatistics, collect_statistics

from _common import (
    add_model_and_data_arguments,
    describe_inputs,
    load_inputs,
    split_choices,
    write_rows,
)

log = logging.getLogger("benchmarks.pruning")

CRITERIA = ("magnitude", "activation", "taylor")
# target name → the PruneConfig fields it sets (heads/ffn are scored by the criterion).
WIDTH_TARGETS: dict[str, dict[str, Any]] = {
    "ffn10": {"ffn": {"ratio": 0.10, "multiple_of": 32}},
    "ffn25": {"ffn": {"ratio": 0.25, "multiple_of": 32}},
    "ffn40": {"ffn": {"ratio": 0.40, "multiple_of": 32}},
    "heads-1/group": {"heads": {"ratio": 1 / 3}},
}
DEPTH_TARGETS = {"layers2": 2, "layers4": 4}


@dataclass(frozen=True)
class Row:
    criterion: str
    target: str
    shape: str
    parameters: int
    perplexity: float
    kl_divergence: float
    top1_agreement: float
    seconds: float


def gather(model: nn.Module, windows: torch.Tensor, criterion: str, batch_size: int):
    """Statistics for one criterion (plus layer distances), and the seconds they took."""
    start = time.perf_counter()
    stats = collect_statistics(
        model,
        windows,
        batch_size,
        activations=criterion == "activation",
        gradients=criterion == "taylor",
        layer_distances=True,
    )
    return stats, time.perf_counter() - start


def measure(
    source: nn.Module,
    config: PruneConfig,
    stats: CalibrationStatistics | None,
    baseline: BaselineLogProbs,
    label: tuple[str, str],
) -> Row:
    model = copy.deepcopy(source)
    start = time.perf_counter()
    result = prune_with_statistics(model, config, stats)
    seconds = time.perf_counter() - start
    quality = measure_quality(model, baseline.windows, baseline)
    after = result.details["per_layer_after"]
    shape = (
        f"{model.config.num_hidden_layers}L × {after['query_heads']}q/{after['kv_heads']}kv "
        f"× {after['ffn_channels']}"
    )
    row = Row(
        criterion=label[0],
        target=label[1],
        shape=shape,
        parameters=count_params(model),
        perplexity=quality.perplexity,
        kl_divergence=quality.kl_divergence,
        top1_agreement=quality.top1_agreement,
        seconds=seconds,
    )
    del model
    gc.collect()
    log.info("%s", row)
    return row


def last_layers(num_layers: int, count: int) -> list[int]:
    """The naive depth reference: the `count` layers before the final one."""
    return list(range(num_layers - 1 - count, num_layers - 1))


def render(rows: list[Row], baseline_ppl: float, parameters: int, header: str) -> str:
    lines = [
        header,
        "",
        f"Baseline: {parameters:,} parameters, perplexity {baseline_ppl:.3f}.",
        "",
        "| target | criterion | shape (layers × heads × FFN) | parameters | perplexity "
        "| KL / token | top-1 agree | time (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.target} | {r.criterion} | {r.shape} | {r.parameters / 1e6:.2f}M "
            f"({r.parameters / parameters:.3f}×) | {r.perplexity:.3f} | {r.kl_divergence:.4f} "
            f"| {100 * r.top1_agreement:.1f}% | {r.seconds:.1f} |"
        )
    by_target: dict[str, dict[str, Row]] = {}
    for r in rows:
        by_target.setdefault(r.target, {})[r.criterion] = r
    verdicts = []
    for target, by_criterion in by_target.items():
        magnitude = by_criterion.get("magnitude")
        if magnitude is None:
            continue
        for criterion in ("activation", "taylor"):
            other = by_criterion.get(criterion)
            if other is not None:
                ratio = other.kl_divergence / magnitude.kl_divergence
                verdicts.append(f"| {target} | {criterion} | {ratio:.2f} |")
    if verdicts:
        lines += ["", "| target | criterion | KL / magnitude KL |", "|---|---|---|", *verdicts]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_and_data_arguments(parser)
    parser.add_argument("--criteria", default=",".join(CRITERIA))
    targets = (*WIDTH_TARGETS, *DEPTH_TARGETS)
    parser.add_argument("--targets", default=",".join(targets))
    args = parser.parse_args(argv)
    split_choices(parser, args, {"criteria": CRITERIA, "targets": targets})
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    inputs = load_inputs(args)
    model, windows, baseline = inputs.model, inputs.windows, inputs.baseline
    rows: list[Row] = []
    pass_seconds: dict[str, float] = {}
    width = [t for t in args.targets if t in WIDTH_TARGETS]
    depth = [t for t in args.targets if t in DEPTH_TARGETS]
    layer_stats = None
    for criterion in args.criteria:
        stats = None
        if criterion != "magnitude" or (depth and layer_stats is None):
            stats, pass_seconds[criterion] = gather(model, windows, criterion, args.batch_size)
            layer_stats = layer_stats or stats
        for target in width:
            config = PruneConfig(criterion=criterion, **WIDTH_TARGETS[target])
            rows.append(measure(model, config, stats, baseline, (criterion, target)))
    num_layers = model.config.num_hidden_layers
    for target in depth:
        count = DEPTH_TARGETS[target]
        by_score = PruneConfig(layers={"remove": count})
        rows.append(measure(model, by_score, layer_stats, baseline, ("cosine", target)))
        naive = PruneConfig(layers={"indices": last_layers(num_layers, count)})
        rows.append(measure(model, naive, None, baseline, ("last layers", target)))
    passes = ", ".join(f"{c}: {s:.0f} s" for c, s in pass_seconds.items())
    header = (
        f"## Structured pruning (no recovery): {describe_inputs(args, inputs)}. "
        f"Calibration pass {passes}"
    )
    table = render(rows, baseline.perplexity.perplexity, count_params(model), header)
    sys.stdout.write(table + "\n")
    write_rows(args.out, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
