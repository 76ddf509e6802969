"""`compress export`: a copy of an artifact in another on-disk format, sealed with its own manifest.

An artifact is stored in compressed-tensors' `pack-quantized` format (see quant/packing.py):
what vLLM reads, and what stock transformers with the compressed-tensors package loads through
`AutoModelForCausalLM.from_pretrained(path)` as long as every layer is symmetric.

`int-quantized` exists for the asymmetric case. transformers 5.23 with compressed-tensors 0.20
cannot load an asymmetric `pack-quantized` checkpoint, ours or llm-compressor's: when it builds
the empty model it allocates `weight_zero_point` unpacked as (N, G), while the format, the
package's own compressor and vLLM store it packed along N as (N·bits/32, G), so loading stops
on a size mismatch (the same class of failure as vllm-project/llm-compressor#1618).
`int-quantized` is compressed-tensors' unpacked integer layout, which that loader reads:

    weight             int8 (N, K)   signed codes, code − 2^(bits−1)
    weight_scale       (N, G)        unchanged
    weight_zero_point  int8 (N, G)   signed, asymmetric layers only

The values are the same integers, so the dequantized weights, and the logits, are identical;
the cost is one byte per weight instead of bits/8 on disk and in memory.
"""

from __future__ import annotations

import copy
import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from safetensors.torch import load_file, save_file

from compress.artifact import (
    MANIFEST,
    NOT_CARRIED_BY_EXPORTS,
    PACKED_FORMAT,
    REPORT_FILES,
    WEIGHTS,
    layer_specs,
    seal_manifest,
    verify_artifact,
)
from compress.errors import ArtifactError, BadInputError
from compress.fileio import sha256_file, staging_dir
from compress.quant.packing import unpack_weight, unpack_zero_points
from compress.quant.primitives import QuantSpec

log = logging.getLogger(__name__)

ExportFormat = Literal["int-quantized"]
EXPORT_FORMATS: tuple[str, ...] = get_args(ExportFormat)


def to_int_quantized(
    packed: dict[str, torch.Tensor], specs: dict[str, QuantSpec]
) -> dict[str, torch.Tensor]:
    """The tensors of a `pack-quantized` state dict in the `int-quantized` layout."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in packed.items():
        layer, name = key.rsplit(".", 1)
        if layer not in specs or name in ("weight_scale", "bias"):
            out[key] = tensor
        elif name == "weight_packed":
            spec = specs[layer]
            out_features, in_features = packed[f"{layer}.weight_shape"].tolist()
            offset = 1 << (spec.bits - 1)
            codes = unpack_weight(tensor, spec.bits, in_features)
            out[f"{layer}.weight"] = (codes - offset).to(torch.int8)
            zero = packed.get(f"{layer}.weight_zero_point")
            if zero is not None:
                zero = unpack_zero_points(zero, spec.bits, out_features)
                out[f"{layer}.weight_zero_point"] = (zero - offset).to(torch.int8)
        # weight_shape and the packed zero point are replaced by what is written above.
    return out


def int_quantized_config(qconfig: dict[str, Any]) -> dict[str, Any]:
    config = copy.deepcopy(qconfig)
    config["format"] = "int-quantized"
    for group in config.get("config_groups", {}).values():
        group["format"] = "int-quantized"
    return config


def _refuse_experts(source: Path, layers: list[str]) -> None:
    """Stock transformers merges per-expert checkpoint tensors into its fused expert parameters
    through a conversion that finds no `weight` in the unpacked layout and fails; the
    pack-quantized artifact itself is what it reads (symmetric)."""
    experts = [name for name in layers if re.search(r"\.experts\.\d+\.", name)]
    if experts:
        raise ArtifactError(
            f"{source}: int-quantized cannot carry quantized MoE experts ({experts[0]} and "
            f"{len(experts) - 1} more): stock transformers fails to merge them into its fused "
            "expert weights; a symmetric artifact loads in stock transformers as it is"
        )


def verified_source(source: Path, destination: Path, *, overwrite: bool) -> dict[str, Any]:
    """Every export's first step: refuse the source itself or an existing destination (unless
    `overwrite`), then verify the source artifact; returns its manifest."""
    if destination.resolve() == source.resolve():
        raise BadInputError(f"{destination}: export destination is the source artifact itself")
    if destination.exists() and not overwrite:
        raise BadInputError(f"{destination}: already exists (pass --overwrite to replace it)")
    return verify_artifact(source)


def export_manifest(
    source: Path, manifest: dict[str, Any], fmt: str, **details: Any
) -> dict[str, Any]:
    """The export's own manifest fields: the source's (less what is not carried over) and an
    `export` entry saying from which artifact, with which verdict, and how."""
    fields = {k: v for k, v in manifest.items() if k not in NOT_CARRIED_BY_EXPORTS}
    fields["export"] = {
        "format": fmt,
        "from": str(source),
        "from_manifest_sha256": sha256_file(source / MANIFEST),
        "from_verdict": (manifest.get("verdict") or {}).get("verdict"),
        **details,
    }
    return fields


def export_artifact(
    source: Path, destination: Path, fmt: ExportFormat, *, overwrite: bool = False
) -> Path:
    """Verify `source`, then write it in `fmt` to `destination` (staged, renamed into place)."""
    if fmt not in EXPORT_FORMATS:
        raise BadInputError(f"--format: {fmt!r} is not one of {list(EXPORT_FORMATS)}")
    manifest = verified_source(source, destination, overwrite=overwrite)
    config = json.loads((source / "config.json").read_text(encoding="utf-8"))
    qconfig = config.get("quantization_config")
    if not qconfig or qconfig.get("format") != PACKED_FORMAT:
        raise ArtifactError(
            f"{source / 'config.json'}: quantization_config.format is not {PACKED_FORMAT!r}; "
            "only quantized artifacts written by compress can be exported"
        )
    packed = load_file(str(source / WEIGHTS))
    layers = [k.removesuffix(".weight_packed") for k in packed if k.endswith(".weight_packed")]
    specs = layer_specs(qconfig, layers)
    _refuse_experts(source, layers)

    with staging_dir(destination) as tmp:
        save_file(to_int_quantized(packed, specs), str(tmp / WEIGHTS), metadata={"format": "pt"})
        config["quantization_config"] = int_quantized_config(qconfig)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        for name in manifest["files"]:
            if name not in (WEIGHTS, "config.json"):
                shutil.copy2(source / name, tmp / name)
        for name in REPORT_FILES:
            if (source / name).is_file():
                shutil.copy2(source / name, tmp / name)
        seal_manifest(tmp, export_manifest(source, manifest, fmt))
    log.info("exported %s as %s to %s (%d quantized layers)", source, fmt, destination, len(specs))
    return destination
