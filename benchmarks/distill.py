"""Distillation recovery on the demo model: KL divergence and perplexity to the original model
after pruning, after distillation, and after the final INT4 step; QAT vs post-training INT4.

Rows, each measured against the unpruned model on the same held-out windows:

1. pruned: the recipes/prune-distill-int4.yaml pruning (FFN 25 %, one query head per KV group,
   activation scores), no recovery;
2. pruned → distilled: the distill stage on the calibration text (logit KL, T = 2, α = 0.7);
3. pruned → distilled → INT4 (GPTQ g64): post-training quantization of the distilled model;
4. pruned → distilled → INT4 (RTN g64): the same with round-to-nearest, the baseline for 5;
5. pruned → distilled with QAT (RTN g64 fake quantization) → INT4 (RTN g64).

    .venv/bin/python benchmarks/distill.py                   # about 20 minutes on 2 cores
    .venv/bin/python benchmarks/distill.py --steps 20 --no-qat

Target: distillation removes at least half of the KL divergence that pruning added.
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys
import time
from dataclasses import dataclass

from torch import nn

import compress.stages  # noqa: F401  (registers the stage handlers)
from compress.distill.config import DistillConfig
from compress.evaluate.quality import BaselineLogProbs, measure_quality
from compress.prune.config import PruneConfig
from compress.quant.config import GPTQOptions, QuantizeConfig
from compress.quant.linear import QuantLinear
from compress.registry import StageContext, handler_for

from _common import add_model_and_data_arguments, describe_inputs, load_inputs, write_rows

log = logging.getLogger("benchmarks.distill")

PRUNE = PruneConfig(
    criterion="activation", heads={"ratio": 1 / 3}, ffn={"ratio": 0.25, "multiple_of": 64}
)


@dataclass(frozen=True)
class Row:
    model: str
    parameters: int
    perplexity: float
    kl_divergence: float
    top1_agreement: float
    seconds: float  # the step that produced this row


def logical_parameters(model: nn.Module) -> int:
    """Parameters counted as weights, not as storage: a packed INT4 Linear of N × K counts
    N·K (+ bias), not its int32 words, scales and zero points."""
    packed = {n for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    dense = sum(
        p.numel()
        for name, p in model.named_parameters(remove_duplicate=True)
        if name.rpartition(".")[0] not in packed
    )
    quantized = sum(
        m.in_features * m.out_features + (0 if m.bias is None else m.bias.numel())
        for n, m in model.named_modules()
        if n in packed
    )
    return dense + quantized


def measure(name: str, model: nn.Module, baseline: BaselineLogProbs, seconds: float) -> Row:
    quality = measure_quality(model, baseline.windows, baseline)
    row = Row(
        name, logical_parameters(model), quality.perplexity, quality.kl_divergence,
        quality.top1_agreement, seconds,
    )  # fmt: skip
    log.info("%s", row)
    return row


def apply(model: nn.Module, config, context: StageContext) -> float:
    start = time.perf_counter()
    handler = handler_for(config)
    handler.preflight(model, config)
    handler.apply(model, config, context)
    return time.perf_counter() - start


def render(rows: list[Row], baseline_ppl: float, header: str) -> str:
    lines = [
        header,
        "",
        f"Baseline perplexity {baseline_ppl:.3f}.",
        "",
        "| model | parameters | perplexity | KL / token | top-1 agree | step time (s) |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r.model} | {r.parameters / 1e6:.2f}M | {r.perplexity:.3f} | {r.kl_divergence:.4f} "
        f"| {100 * r.top1_agreement:.1f}% | {r.seconds:.0f} |"
        for r in rows
    ]
    pruned, distilled = rows[0].kl_divergence, rows[1].kl_divergence
    lines.append(
        f"\nDistillation removed {100 * (pruned - distilled) / pruned:.0f} % of the KL divergence "
        "that pruning added (target ≥ 50 %)."
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_and_data_arguments(parser)
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps per distillation")
    parser.add_argument("--train-batch", type=int, default=4, help="sequences per step")
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--no-qat", action="store_true", help="skip rows 4 and 5")
    parser.set_defaults(samples=128, seq_len=256, dtype="float32")
    args = parser.parse_args(argv)
    inputs = load_inputs(args)
    baseline = inputs.baseline
    context = StageContext(
        dtype=args.dtype,
        calibration_windows=lambda: inputs.windows,
        calibration_batch_size=args.batch_size,
        teacher=lambda _source: inputs.model,
    )
    pruned = copy.deepcopy(inputs.model)
    rows = [measure("pruned", pruned, baseline, apply(pruned, PRUNE, context))]
    distill = {
        "steps": args.steps,
        "batch_size": args.train_batch,
        "lr": args.lr,
        "warmup_steps": max(1, args.steps // 10),
    }
    distilled = copy.deepcopy(pruned)
    seconds = apply(distilled, DistillConfig(**distill), context)
    rows.append(measure("pruned → distilled", distilled, baseline, seconds))
    gptq = QuantizeConfig(
        method="gptq", bits=4, group_size=64, symmetric=False, gptq=GPTQOptions(act_order=True)
    )
    final = copy.deepcopy(distilled)
    seconds = apply(final, gptq, context)
    rows.append(measure("pruned → distilled → INT4 GPTQ g64", final, baseline, seconds))
    if not args.no_qat:
        rtn = QuantizeConfig(bits=4, group_size=64, symmetric=False)
        post = copy.deepcopy(distilled)
        seconds = apply(post, rtn, context)
        rows.append(measure("pruned → distilled → INT4 RTN g64", post, baseline, seconds))
        qat = copy.deepcopy(pruned)
        qat_config = {"bits": 4, "group_size": 64, "symmetric": False}
        seconds = apply(qat, DistillConfig(**distill, qat=qat_config), context)
        seconds += apply(qat, rtn, context)
        rows.append(measure("pruned → distilled with QAT → INT4 RTN g64", qat, baseline, seconds))
    header = (
        f"## Distillation recovery: {describe_inputs(args, inputs)}; {args.steps} steps × "
        f"{args.train_batch} × {args.seq_len} tokens, lr {args.lr}"
    )
    sys.stdout.write(render(rows, baseline.perplexity.perplexity, header) + "\n")
    write_rows(args.out, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
