"""Artifacts: save, load, verify, inspect.

An artifact is a directory:

    model.safetensors     every tensor (packed weights, scales, zero points, the rest in dtype)
    config.json           the HF config + a compressed-tensors `quantization_config`
    generation_config.json, tokenizer files
    recipe.lock.yaml      the fully resolved recipe that made it
    manifest.json         source model + sha256, sha256 of every file above, versions, stages
    report.json/.md/.html written by the pipeline after evaluation (outside the manifest)
    README.md             the model card, written with the report

It is written into a temporary directory that is renamed into place, so a crash never leaves
half an artifact.
"""

from __future__ import annotations

import copy
import json
import logging
import re
from collections import defaultdict
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from compress.errors import ArtifactError
from compress.fileio import atomic_write_json, sha256_file, staging_dir
from compress.models import DTYPES, replace_module
from compress.quant.config import PER_CHANNEL
from compress.quant.linear import QuantLinear
from compress.quant.primitives import QuantSpec

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
WEIGHTS = "model.safetensors"
RECIPE_LOCK = "recipe.lock.yaml"
FORMAT_VERSION = 1
PACKED_FORMAT = "pack-quantized"  # compressed-tensors' name for the layout in quant/packing.py
# Files the pipeline adds after the manifest is sealed; verify() allows them.
REPORT_FILES = frozenset(
    {"report.json", "report.md", "report.html", "README.md"}
)  # README: model card
REPORT_PREFIX = "report-"  # plots beside the report (compress/evaluate/plots.py)
_VERSIONED_PACKAGES = ("compress", "torch", "transformers", "safetensors", "lm_eval", "pydantic")


def package_versions() -> dict[str, str]:
    versions = {}
    for name in _VERSIONED_PACKAGES:
        try:
            versions[name] = metadata.version(name.replace("_", "-"))
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


# --------------------------------------------------------------------------- quantization config


def _spec_args(spec: QuantSpec) -> dict[str, Any]:
    """compressed-tensors `QuantizationArgs` for weights."""
    return {
        "num_bits": spec.bits,
        "type": "int",
        "symmetric": spec.symmetric,
        "strategy": "channel" if spec.group_size == PER_CHANNEL else "group",
        "group_size": None if spec.group_size == PER_CHANNEL else spec.group_size,
        "dynamic": False,
        "observer": "minmax",
        "actorder": None,
        "block_structure": None,
    }


def spec_from_args(args: dict[str, Any]) -> QuantSpec:
    group = args.get("group_size")
    return QuantSpec(
        bits=int(args["num_bits"]),
        group_size=PER_CHANNEL if group in (None, -1) else int(group),
        symmetric=bool(args["symmetric"]),
    )


def quantization_config(model: nn.Module) -> dict[str, Any] | None:
    """A compressed-tensors `pack-quantized` config describing every QuantLinear in `model`.

    Layers are grouped by scheme; each group targets its layers by exact-name regex, so the
    config says precisely which module holds which scheme.
    """
    groups: dict[QuantSpec, list[str]] = defaultdict(list)
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            groups[module.spec].append(name)
    if not groups:
        return None
    quantized = {n for names in groups.values() for n in names}
    ignore = [
        n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in quantized
    ]
    return {
        "quant_method": "compressed-tensors",
        "format": PACKED_FORMAT,
        "quantization_status": "compressed",
        "config_groups": {
            f"group_{i}": {
                "targets": [f"re:^{re.escape(n)}$" for n in names],
                "weights": _spec_args(spec),
                "input_activations": None,
                "output_activations": None,
            }
            for i, (spec, names) in enumerate(groups.items())
        },
        "ignore": ignore,
    }


def layer_specs(qconfig: dict[str, Any], linear_names: list[str]) -> dict[str, QuantSpec]:
    """Which Linear gets which spec, from a `quantization_config` we wrote."""
    specs: dict[str, QuantSpec] = {}
    for group_name, group in qconfig.get("config_groups", {}).items():
        spec = spec_from_args(group["weights"])
        patterns = [re.compile(t.removeprefix("re:")) for t in group["targets"]]
        matched = [n for n in linear_names if any(p.fullmatch(n) for p in patterns)]
        if not matched:
            raise ArtifactError(f"quantization group {group_name} matches no Linear layer")
        for name in matched:
            if name in specs:
                raise ArtifactError(f"layer {name} is targeted by two quantization groups")
            specs[name] = spec
    return specs


# --------------------------------------------------------------------------- save


def _deduplicated_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with tied tensors stored once (safetensors refuses shared storage)."""
    seen: dict[tuple[int, int], str] = {}
    out: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        key = (tensor.data_ptr(), tensor.numel())
        if key in seen and tensor.numel() > 0:
            continue  # e.g. lm_head.weight tied to embed_tokens.weight; tie_weights restores it
        seen[key] = name
        out[name] = tensor.detach().contiguous()
    return out


def save_artifact(
    model: nn.Module,
    tokenizer: Any | None,
    final_dir: Path,
    *,
    recipe_yaml: str,
    manifest_fields: dict[str, Any],
) -> Path:
    """Write the artifact into a staging directory, seal it with a manifest, rename into place."""
    with staging_dir(final_dir) as tmp:
        save_file(_deduplicated_state_dict(model), str(tmp / WEIGHTS), metadata={"format": "pt"})
        config = copy.deepcopy(model.config)
        # Drop what the source carried (e.g. a GGUF loader's quantization_config): the
        # artifact's tensors are described by our config alone.
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        qconfig = quantization_config(model)
        if qconfig is not None:
            config.quantization_config = qconfig
        config.dtype = next(model.parameters()).dtype
        config.save_pretrained(tmp)
        generation_config = getattr(model, "generation_config", None)
        if generation_config is not None:
            generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / RECIPE_LOCK).write_text(recipe_yaml, encoding="utf-8")
        seal_manifest(tmp, manifest_fields)
    log.info("artifact written to %s", final_dir)
    return final_dir


def seal_manifest(directory: Path, fields: dict[str, Any]) -> None:
    """Write manifest.json: `fields` plus the sha256 and size of every file in `directory`."""
    files = {
        p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size}
        for p in sorted(directory.iterdir())
        if p.is_file() and p.name != MANIFEST
    }
    manifest = {
        "format_version": FORMAT_VERSION,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "versions": package_versions(),
        **fields,
        "files": files,
    }
    atomic_write_json(directory / MANIFEST, manifest)


# --------------------------------------------------------------------------- verify / inspect


def read_manifest(path: Path) -> dict[str, Any]:
    if not path.is_dir():
        raise ArtifactError(f"{path}: not an artifact directory (does not exist)")
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise ArtifactError(f"{path}: no {MANIFEST}; not an artifact or written incompletely")
    try:
        return json.loads(manifest_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{manifest_path}: not valid JSON: {exc}") from None


def verify_artifact(path: Path) -> dict[str, Any]:
    """Recompute every file's sha256 against the manifest; raise ArtifactError on any change."""
    manifest = read_manifest(path)
    problems = []
    for name, entry in manifest.get("files", {}).items():
        file = path / name
        if not file.is_file():
            problems.append(f"missing file {name}")
        elif sha256_file(file) != entry["sha256"]:
            problems.append(f"{name}: sha256 differs from the manifest (file changed)")
    listed = set(manifest.get("files", {})) | REPORT_FILES | {MANIFEST}
    extra = sorted(
        p.name
        for p in path.iterdir()
        if p.is_file() and p.name not in listed and not p.name.startswith(REPORT_PREFIX)
    )
    problems += [f"unlisted file {name}" for name in extra]
    if problems:
        raise ArtifactError(
            f"{path}: artifact does not match its manifest:\n  " + "\n  ".join(problems)
        )
    return manifest


def describe_artifact(path: Path) -> dict[str, Any]:
    """What `compress inspect` prints: provenance, schemes, sizes, files."""
    manifest = read_manifest(path)
    config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    qconfig = config.get("quantization_config") or {}
    schemes = {
        name: {**group["weights"], "layers": len(group["targets"])}
        for name, group in qconfig.get("config_groups", {}).items()
    }
    return {
        "path": str(path),
        "recipe": manifest.get("recipe_name"),
        "source": manifest.get("source"),
        "dtype": manifest.get("dtype"),
        "architecture": config.get("architectures"),
        "format": qconfig.get("format"),
        "export": manifest.get("export"),
        "quantization": schemes,
        "unquantized_linear": qconfig.get("ignore", []),
        "stages": [s.get("summary") for s in manifest.get("stages", [])],
        "files": manifest.get("files", {}),
        "total_bytes": sum(f["bytes"] for f in manifest.get("files", {}).values()),
    }


# --------------------------------------------------------------------------- load


def build_model(path: Path, dtype: torch.dtype) -> nn.Module:
    """An empty model of the artifact's architecture with QuantLinear where the config says."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path)
    qconfig = getattr(config, "quantization_config", None)
    if qconfig is not None:
        stored_format = qconfig.get("format")
        if stored_format != PACKED_FORMAT:
            raise ArtifactError(
                f"{path / 'config.json'}: quantization_config.format is {stored_format!r}; "
                f"compress loads {PACKED_FORMAT!r} artifacts (an export in another format is "
                "for other runtimes: load it with transformers' AutoModelForCausalLM)"
            )
        # We rebuild the quantized layers ourselves; transformers must not try to.
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if qconfig:
        linear_names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        for name, spec in layer_specs(qconfig, linear_names).items():
            linear = model.get_submodule(name)
            replace_module(
                model,
                name,
                QuantLinear(
                    linear.in_features,
                    linear.out_features,
                    bias=linear.bias is not None,
                    spec=spec,
                    dtype=dtype,
                ),
            )
    return model


def _load_weights(model: nn.Module, weights: Path) -> None:
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError) as exc:
        raise ArtifactError(f"{weights}: cannot read safetensors: {exc}") from None
    result = model.load_state_dict(state, strict=False)
    if result.unexpected_keys:
        raise ArtifactError(
            f"{weights}: tensors the model does not have: {result.unexpected_keys[:5]}"
        )
    fresh = model.state_dict()
    loaded_ptrs = {fresh[k].data_ptr() for k in state}
    untied = [k for k in result.missing_keys if fresh[k].data_ptr() not in loaded_ptrs]
    if untied:
        raise ArtifactError(f"{weights}: tensors missing from the file: {untied[:5]}")


def load_artifact(
    path: str | Path, *, verify: bool = True, with_tokenizer: bool = True
) -> tuple[nn.Module, Any]:
    """(model, tokenizer) from an artifact; with `verify`, hashes are checked first.

    The tokenizer is None when `with_tokenizer` is False (stage checkpoints have none).
    """
    from transformers import AutoTokenizer

    path = Path(path)
    manifest = verify_artifact(path) if verify else read_manifest(path)
    dtype = DTYPES[manifest.get("dtype", "float32")]
    model = build_model(path, dtype)
    _load_weights(model, path / WEIGHTS)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(path) if with_tokenizer else None
    return model, tokenizer
