"""Quantization quality and cost: method × scheme on one model, optionally against llm-compressor.

For every method (RTN, GPTQ, GPTQ + act_order, each optionally with the MSE range observer:
`+mse`) and scheme (INT8 per-channel, INT4 g64, INT4
g32) the source model is quantized in memory and measured against the unquantized baseline on
the same held-out windows: perplexity, KL(baseline ‖ quantized) per token, top-1 agreement,
quantization time and peak memory (resident set size above the start of the stage; CUDA peak
allocated where there is a GPU).

With `--llmcompressor-python` (a Python that has llm-compressor, e.g. /work/lcvenv/bin/python:
it pins its own transformers, so it lives in its own venv), the same table is produced for its
`oneshot` GPTQ (W4A16 asymmetric g64/g32, W8A16 symmetric per-channel, actorder none / static)
on the very same calibration windows, and ours/theirs ratios are printed. Its checkpoints are
read back with our own `pack-quantized` reader (`QuantLinear.from_packed`): the format is
shared, and stock transformers cannot load its asymmetric checkpoints (see compress/export.py).

    .venv/bin/python benchmarks/quality.py                     # ours only
    .venv/bin/python benchmarks/quality.py --llmcompressor-python /work/lcvenv/bin/python

Note: the demo model's weights were Q4_1 (4-bit, blocks of 32) before dequantization, so INT4
g32 sits on its original grid and looks nearly lossless; g64 is the informative INT4 row.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import logging
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

import compress.stages  # noqa: F401  (registers the stage handlers)
from compress.artifact import save_artifact, spec_from_args
from compress.evaluate.quality import BaselineLogProbs, measure_quality
from compress.models import replace_module
from compress.profiling import PeakMemory
from compress.quant.config import GPTQOptions, QuantizeConfig
from compress.quant.linear import QuantLinear
from compress.quant.packing import PackedWeight
from compress.registry import StageContext, handler_for

from _common import (
    add_model_and_data_arguments,
    describe_inputs,
    load_inputs,
    split_choices,
    write_rows,
)

log = logging.getLogger("benchmarks.quality")

DRIVER = Path(__file__).with_name("_llmcompressor_driver.py")

# scheme name → (bits, group_size, symmetric); llm-compressor's preset of the same shape.
SCHEMES: dict[str, tuple[int, int, bool]] = {
    "int8-channel": (8, -1, True),
    "int4-g64": (4, 64, False),
    "int4-g32": (4, 32, False),
}
THEIR_SCHEME = {"int8-channel": "W8A16", "int4-g64": "W4A16_g64", "int4-g32": "W4A16_g32"}
# "+mse": the MSE range observer (QuantizeConfig.observer); llm-compressor gets its own.
METHODS = ("rtn", "gptq", "gptq+act_order", "rtn+mse", "gptq+act_order+mse")
DEFAULT_METHODS = ("rtn", "gptq", "gptq+act_order", "gptq+act_order+mse")


@dataclass(frozen=True)
class Row:
    tool: str
    method: str
    scheme: str
    perplexity: float
    kl_divergence: float
    top1_agreement: float
    seconds: float
    peak_rss_increase_bytes: int | None
    cuda_peak_bytes: int | None


def quantize_config(method: str, scheme: str, args: argparse.Namespace) -> QuantizeConfig:
    bits, group_size, symmetric = SCHEMES[scheme]
    observer = "mse" if method.endswith("+mse") else "minmax"
    common = {"bits": bits, "group_size": group_size, "symmetric": symmetric, "observer": observer}
    if method.startswith("rtn"):
        return QuantizeConfig(**common)
    options = GPTQOptions(
        damp_percent=args.damp_percent,
        block_size=args.block_size,
        act_order="+act_order" in method,
    )
    return QuantizeConfig(method="gptq", gptq=options, **common)


def run_ours(
    source: nn.Module,
    method: str,
    scheme: str,
    windows: torch.Tensor,
    baseline: BaselineLogProbs,
    args: argparse.Namespace,
) -> Row:
    model = copy.deepcopy(source)
    config = quantize_config(method, scheme, args)
    context = StageContext(
        dtype=args.dtype,
        calibration_windows=lambda: windows,
        calibration_batch_size=args.batch_size,
    )
    start = time.perf_counter()
    with PeakMemory() as memory:
        handler_for(config).apply(model, config, context)
    seconds = time.perf_counter() - start
    quality = measure_quality(model, baseline.windows, baseline)
    del model
    gc.collect()
    return Row(
        tool="compress",
        method=method,
        scheme=scheme,
        perplexity=quality.perplexity,
        kl_divergence=quality.kl_divergence,
        top1_agreement=quality.top1_agreement,
        seconds=seconds,
        peak_rss_increase_bytes=memory.result.peak_rss_increase_bytes,
        cuda_peak_bytes=memory.result.cuda_peak_bytes,
    )


def load_pack_quantized(source: nn.Module, checkpoint: Path, dtype: torch.dtype) -> nn.Module:
    """`source` with every Linear that `checkpoint` stores packed replaced by a QuantLinear."""
    config = json.loads((checkpoint / "config.json").read_text())["quantization_config"]
    (group,) = config["config_groups"].values()
    spec = spec_from_args(group["weights"])
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(checkpoint.glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    if any(name.endswith("g_idx") for name in tensors):
        raise ValueError(f"{checkpoint}: has g_idx (activation reordering); not comparable")
    model = copy.deepcopy(source)
    layers = [k.removesuffix(".weight_packed") for k in tensors if k.endswith(".weight_packed")]
    for name in layers:
        packed = PackedWeight(
            weight_packed=tensors[f"{name}.weight_packed"],
            weight_scale=tensors[f"{name}.weight_scale"].to(dtype),
            weight_zero_point=tensors.get(f"{name}.weight_zero_point"),
        )
        replace_module(model, name, QuantLinear.from_packed(packed, spec, None, dtype))
    log.info("read %d packed layers from %s", len(layers), checkpoint)
    return model


def save_for_driver(model: nn.Module, tokenizer: Any, windows: torch.Tensor, root: Path) -> Path:
    # save_artifact, not save_pretrained: a model loaded from GGUF refuses save_pretrained, and
    # an artifact without quantized layers is a plain safetensors checkpoint.
    model_dir = save_artifact(
        model, tokenizer, root / "model", recipe_yaml="", manifest_fields={"dtype": "source"}
    )
    save_file({"input_ids": windows.contiguous()}, str(root / "windows.safetensors"))
    return model_dir


def run_theirs(
    python: str,
    source: nn.Module,
    model_dir: Path,
    windows_file: Path,
    method: str,
    scheme: str,
    baseline: BaselineLogProbs,
    args: argparse.Namespace,
    root: Path,
) -> Row:
    out = root / f"lc-{scheme}-{method}"
    command = [
        python,
        str(DRIVER),
        "--model-dir",
        str(model_dir),
        "--windows",
        str(windows_file),
        "--scheme",
        THEIR_SCHEME[scheme],
        "--dampening",
        str(args.damp_percent),
        "--block-size",
        str(args.block_size),
        "--out",
        str(out),
        *(["--act-order"] if "+act_order" in method else []),
        *(["--observer", "mse"] if method.endswith("+mse") else []),
    ]
    log.info("llm-compressor: %s %s", method, scheme)
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    run = json.loads((out / "llmcompressor_run.json").read_text())
    model = load_pack_quantized(source, out, next(source.parameters()).dtype)
    quality = measure_quality(model, baseline.windows, baseline)
    return Row(
        tool=f"llm-compressor {run['versions'].get('llmcompressor', '?')}",
        method=method,
        scheme=scheme,
        perplexity=quality.perplexity,
        kl_divergence=quality.kl_divergence,
        top1_agreement=quality.top1_agreement,
        seconds=run["seconds"],
        peak_rss_increase_bytes=None,  # its process peak includes loading: not comparable
        cuda_peak_bytes=None,
    )


def _mb(n: int | None) -> str:
    return "—" if n is None else f"{n / 2**20:.0f} MiB"


def render(rows: list[Row], baseline_ppl: float, header: str) -> str:
    lines = [
        header,
        "",
        f"Baseline perplexity {baseline_ppl:.3f}.",
        "",
        "| tool | method | scheme | perplexity | KL / token | top-1 agree | time (s) "
        "| peak RSS + | CUDA peak |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.tool} | {r.method} | {r.scheme} | {r.perplexity:.3f} | {r.kl_divergence:.4f} "
            f"| {100 * r.top1_agreement:.1f}% | {r.seconds:.1f} "
            f"| {_mb(r.peak_rss_increase_bytes)} | {_mb(r.cuda_peak_bytes)} |"
        )
    ours = {(r.method, r.scheme): r for r in rows if r.tool == "compress"}
    theirs = [r for r in rows if r.tool != "compress"]
    if theirs:
        lines += [
            "",
            "| method | scheme | KL ours/theirs | time ours/theirs |",
            "|---|---|---|---|",
        ]
        for t in theirs:
            o = ours.get((t.method, t.scheme))
            if o is not None:
                lines.append(
                    f"| {t.method} | {t.scheme} | {o.kl_divergence / t.kl_divergence:.2f} "
                    f"| {o.seconds / t.seconds:.2f} |"
                )
    rtn = ours.get(("rtn", "int4-g64"))
    for method in ("gptq+act_order", "gptq+act_order+mse"):
        gptq = ours.get((method, "int4-g64"))
        if rtn and gptq:
            lines.append(
                f"\nINT4 g64: {method} KL / RTN KL = "
                f"{gptq.kl_divergence / rtn.kl_divergence:.2f} (target ≤ 0.5)."
            )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_and_data_arguments(parser)
    parser.add_argument("--damp-percent", type=float, default=0.01)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS))
    parser.add_argument("--schemes", default=",".join(SCHEMES))
    parser.add_argument("--llmcompressor-python", help="a Python with llm-compressor installed")
    args = parser.parse_args(argv)
    split_choices(parser, args, {"methods": METHODS, "schemes": tuple(SCHEMES)})
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    inputs = load_inputs(args)
    model, windows, baseline = inputs.model, inputs.windows, inputs.baseline
    rows = [
        run_ours(model, method, scheme, windows, baseline, args)
        for scheme in args.schemes
        for method in args.methods
    ]
    if args.llmcompressor_python:
        with tempfile.TemporaryDirectory(prefix="quality-bench-") as tmp:
            root = Path(tmp)
            model_dir = save_for_driver(model, inputs.tokenizer, windows, root)
            rows += [
                run_theirs(
                    args.llmcompressor_python,
                    model,
                    model_dir,
                    root / "windows.safetensors",
                    method,
                    scheme,
                    baseline,
                    args,
                    root,
                )
                for scheme in args.schemes
                for method in args.methods
                if not method.startswith("rtn")
            ]
    header = f"## Quantization quality: {describe_inputs(args, inputs)}"
    table = render(rows, baseline.perplexity.perplexity, header)
    sys.stdout.write(table + "\n")
    write_rows(args.out, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
