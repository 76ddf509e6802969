"""Run llm-compressor's ``oneshot`` GPTQ on fixed calibration windows, for comparison.

This script is a reference baseline, not part of the ``compress`` package, and it must not
import it. It runs in a separate virtualenv (e.g. ``/work/lcvenv``) because llm-compressor
pins its own ``transformers`` and ``compressed-tensors`` versions (llmcompressor 0.14.0.1
requires transformers<=5.17.0 and compressed-tensors==0.19.0), which conflict with the
project venv. Create it with::

    python3 -m venv /work/lcvenv
    /work/lcvenv/bin/pip install -c constraints.txt torch==2.13.0 llmcompressor

and run e.g.::

    /work/lcvenv/bin/python benchmarks/_llmcompressor_driver.py --model-dir MODEL \\
        --windows windows.safetensors --scheme W4A16_g64 --act-order --out OUT

``--windows`` is a safetensors file holding one int64 tensor ``input_ids`` of shape
(num_samples, seq_len). Every window is used, in order, as one calibration sample.

Schemes (weights only, all ``Linear`` layers except ``lm_head``):

* ``W4A16_g64`` / ``W4A16_g32``: int4, asymmetric, group strategy, group size 64 / 32.
* ``W8A16``: int8, symmetric, per-output-channel.

``--act-order`` selects GPTQ ``actorder="static"`` (alias of ``"weight"``); without it
``actorder=None``. Calibration runs on CPU in the checkpoint's dtype (bfloat16). The wall
time of the ``oneshot`` call and the process peak RSS (which includes model loading) go to
``OUT/llmcompressor_run.json``; the compressed model is saved into ``OUT`` with
``save_compressed=True``.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import logging
import platform
import resource
import sys
import time
from pathlib import Path

import torch
from compressed_tensors.quantization import (
    QuantizationArgs,
    QuantizationScheme,
    QuantizationStrategy,
    QuantizationType,
)
from datasets import Dataset
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import GPTQModifier
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

LOG = logging.getLogger("llmcompressor_driver")

SCHEMES = ("W4A16_g64", "W4A16_g32", "W8A16")
VERSIONED_PACKAGES = (
    "llmcompressor",
    "compressed-tensors",
    "transformers",
    "torch",
    "accelerate",
    "datasets",
    "safetensors",
)


def weight_args(scheme: str, observer: str | None = None) -> QuantizationArgs:
    """Return the weight quantization arguments for one of ``SCHEMES``."""
    chosen = {} if observer is None else {"observer": observer}
    if scheme in ("W4A16_g64", "W4A16_g32"):
        return QuantizationArgs(
            **chosen,
            num_bits=4,
            type=QuantizationType.INT,
            strategy=QuantizationStrategy.GROUP,
            group_size=64 if scheme == "W4A16_g64" else 32,
            symmetric=False,
            dynamic=False,
        )
    if scheme == "W8A16":
        return QuantizationArgs(
            **chosen,
            num_bits=8,
            type=QuantizationType.INT,
            strategy=QuantizationStrategy.CHANNEL,
            symmetric=True,
            dynamic=False,
        )
    raise ValueError(f"unknown scheme {scheme!r}; expected one of {SCHEMES}")


def build_modifier(
    scheme: str, act_order: bool, dampening: float, block_size: int, observer: str | None = None
) -> GPTQModifier:
    """Build the GPTQ modifier: all Linear layers but ``lm_head``, weight-only."""
    group = QuantizationScheme(targets=["Linear"], weights=weight_args(scheme, observer))
    return GPTQModifier(
        config_groups={"group_0": group},
        ignore=["lm_head"],
        actorder="static" if act_order else None,
        dampening_frac=dampening,
        block_size=block_size,
    )


def load_windows(path: Path) -> Dataset:
    """Load the calibration windows as a tokenized ``datasets.Dataset``."""
    tensors = load_file(str(path))
    if set(tensors) != {"input_ids"}:
        raise ValueError(f"{path}: expected a single tensor 'input_ids', got {sorted(tensors)}")
    ids = tensors["input_ids"]
    if ids.dtype != torch.int64 or ids.dim() != 2:
        raise ValueError(f"{path}: input_ids must be 2-D int64, got {ids.dtype} {tuple(ids.shape)}")
    rows = ids.tolist()
    return Dataset.from_dict(
        {"input_ids": rows, "attention_mask": [[1] * len(row) for row in rows]}
    )


def versions() -> dict[str, str]:
    """Versions of the packages that determine the result."""
    found = {"python": platform.python_version()}
    for name in VERSIONED_PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "missing"
    return found


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--windows", type=Path, required=True)
    parser.add_argument("--scheme", choices=SCHEMES, required=True)
    parser.add_argument("--act-order", action="store_true")
    parser.add_argument("--observer", choices=["minmax", "mse"], help="weight range observer")
    parser.add_argument("--dampening", type=float, default=0.01)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--out", type=Path, required=True)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args = parse_args(argv)

    dataset = load_windows(args.windows)
    num_samples = len(dataset)
    seq_len = len(dataset[0]["input_ids"])
    LOG.info("calibration: %d windows x %d tokens", num_samples, seq_len)

    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    model = AutoModelForCausalLM.from_pretrained(
        args.model_dir, dtype=torch.bfloat16, device_map=None
    )
    model.eval()
    modifier = build_modifier(
        args.scheme, args.act_order, args.dampening, args.block_size, args.observer
    )
    LOG.info("recipe: %s", modifier)

    start = time.perf_counter()
    model = oneshot(
        model=model,
        tokenizer=tokenizer,
        dataset=dataset,
        recipe=modifier,
        num_calibration_samples=num_samples,
        max_seq_length=seq_len,
        shuffle_calibration_samples=False,
        batch_size=1,
    )
    seconds = time.perf_counter() - start
    # ru_maxrss is in KiB on Linux.
    peak_rss_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    LOG.info("oneshot took %.2f s, peak RSS %.1f MiB", seconds, peak_rss_bytes / 2**20)

    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out, save_compressed=True)
    tokenizer.save_pretrained(args.out)

    record = {
        "seconds": seconds,
        "peak_rss_bytes": peak_rss_bytes,
        "versions": versions(),
        "scheme": args.scheme,
        "act_order": args.act_order,
        "observer": args.observer or "default",
        "num_samples": num_samples,
        "seq_len": seq_len,
        "dampening": args.dampening,
        "block_size": args.block_size,
    }
    (args.out / "llmcompressor_run.json").write_text(json.dumps(record, indent=2) + "\n")
    sys.stdout.write(json.dumps(record) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
