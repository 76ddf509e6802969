"""Artifacts: save, load, verify, inspect.

An artifact is a directory:

    model.safetensors     every tensor (packed weights, scales, zero points, the rest in dtype)
    config.json           the HF config + a compressed-tensors `quantization_config`
    generation_config.json, tokenizer files
    recipe.lock.yaml      the fully resolved recipe that made it
    manifest.json         source model + sha256, sha256 of every file, versions, stages, and
                          once judged the verdict; sealed (compress/seal.py)
    report.json/.md/.html written by the pipeline after evaluation, then sealed with the verdict
    README.md             the model card, written with the report
    manifest.sig          optional: a signature of the manifest by the pipeline's key
    bench.json, bench.md  optional: `compress bench` results, written later, outside the seal

Quantized MoE experts (compress/quant/experts.py) are stored per expert, as compressed-tensors
and llm-compressor store them (`<experts>.<e>.<gate|up|down>.weight_packed`, with the names
the family's per-expert checkpoints use); stock transformers + compressed-tensors reads a
symmetric artifact into its fused experts, dequantized. Asymmetric pack-quantized artifacts,
experts or not, do not load there (upstream; tests/stages/test_interop_compressed_tensors.py).

It is written into a temporary directory that is renamed into place, so a crash never leaves
half an artifact; `publish` moves a judged artifact into its verdict folder only after
verifying it in full.
"""

from __future__ import annotations

import copy
import logging
import re
from collections import defaultdict
from collections.abc import Callable
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from compress.errors import ArtifactError
from compress.evaluate.plots import PLOT_PREFIX  # plots beside the report, sealed with it
from compress.fileio import replace_dir, sha256_file, staging_dir
from compress.models import DTYPES, replace_module
from compress.quant.config import PER_CHANNEL, scheme_name
from compress.quant.experts import (
    QuantExperts,
    holds_3d_weights,
    layout_problem,
    projection_names,
)
from compress.quant.linear import QuantLinear
from compress.quant.primitives import QuantSpec
from compress.seal import (
    MANIFEST,
    SIGNATURE,
    check_manifest,
    check_signature,
    read_json_file,
    write_manifest,
)

log = logging.getLogger(__name__)

WEIGHTS = "model.safetensors"
RECIPE_LOCK = "recipe.lock.yaml"
PACKED_FORMAT = "pack-quantized"  # compressed-tensors' name for the layout in quant/packing.py
REPORT = "report.json"
# What the pipeline writes beside the report when the gate has decided (README: model card),
# sealed into the manifest with the verdict; plots are named report-*.
REPORT_FILES = frozenset({REPORT, "report.md", "report.html", "README.md"})
# Files written after sealing, outside it: verify() neither requires nor refuses them.
ANNEX_FILES = frozenset({SIGNATURE, "bench.json", "bench.md"})
# Manifest fields an export does not carry over: its own files, time and versions, and the
# source's verdict (an export records it as `export.from_verdict`; the export itself was not
# judged).
NOT_CARRIED_BY_EXPORTS = frozenset({"files", "created", "versions", "verdict"})
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
    config says precisely which module holds which scheme. Quantized MoE experts appear as
    their per-expert projections (`<experts>.<e>.gate_proj`, ...): the QuantLinear modules
    QuantExperts holds, in the per-expert layout compressed-tensors uses for MoE checkpoints.
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


def _warn_experts_stock_transformers_cannot_read(model: nn.Module) -> None:
    """Stock transformers reads quantized experts only where it knows the family's per-expert
    checkpoint names (compress/quant/experts.py); elsewhere it would start the experts from
    random weights with a load report, so say so when writing."""
    unread = [n for n, m in model.named_modules() if isinstance(m, QuantExperts)]
    unread = [n for n in unread if not model.get_submodule(n).stock_loadable]
    if unread:
        log.warning(
            "%d quantized experts modules (%s, ...) are stored under per-expert names stock "
            "transformers has no conversion for (model type %s): compress.load reads this "
            "artifact, AutoModelForCausalLM would not load its experts",
            len(unread),
            unread[0],
            getattr(model.config, "model_type", "?"),
        )


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
        _warn_experts_stock_transformers_cannot_read(model)
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


def _file_entries(
    directory: Path, known: dict[str, dict[str, Any]] | None = None
) -> dict[str, dict[str, Any]]:
    """sha256 and size of every file in `directory` but the manifest and the annex; entries
    in `known` (just verified) are reused instead of hashed again."""
    known = known or {}
    entries = {}
    for path in sorted(directory.iterdir()):
        if not path.is_file() or path.name == MANIFEST or path.name in ANNEX_FILES:
            continue
        entry = known.get(path.name)
        if entry is None or entry["bytes"] != path.stat().st_size:
            entry = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
        entries[path.name] = entry
    return entries


def seal_manifest(directory: Path, fields: dict[str, Any]) -> dict[str, Any]:
    """Write manifest.json: `fields` plus the sha256 and size of every file in `directory`,
    sealed (compress/seal.py)."""
    stamp = {
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "versions": package_versions(),
    }
    return write_manifest(directory, {**stamp, **fields}, _file_entries(directory))


def seal_verdict(directory: Path, verdict: dict[str, Any]) -> dict[str, Any]:
    """Seal the gate's verdict and the report files written beside the artifact into its
    manifest. The files sealed before are verified first (and their hashes reused)."""
    manifest = read_manifest(directory)
    # A run resumed after its report was written writes the report again: those files are
    # hashed anew, everything else must be as sealed.
    problems = _listed_file_problems(directory, manifest, skip=_is_report_file)
    if problems:
        raise ArtifactError(
            f"{directory}: changed before its verdict was sealed:\n  " + "\n  ".join(problems)
        )
    fields = {k: v for k, v in manifest.items() if k != "verdict"}
    known = {k: v for k, v in manifest["files"].items() if not _is_report_file(k)}
    return write_manifest(
        directory, {**fields, "verdict": verdict}, _file_entries(directory, known)
    )


# --------------------------------------------------------------------------- verify / inspect


def read_manifest(path: Path) -> dict[str, Any]:
    """The artifact's manifest, checked against its schema and its seal."""
    if not path.is_dir():
        raise ArtifactError(f"{path}: not an artifact directory (does not exist)")
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise ArtifactError(f"{path}: no {MANIFEST}; not an artifact or written incompletely")
    return check_manifest(read_json_file(manifest_path), manifest_path)


def _is_report_file(name: str) -> bool:
    return name in REPORT_FILES or name.startswith(PLOT_PREFIX)


def _listed_file_problems(
    path: Path, manifest: dict[str, Any], skip: Callable[[str], bool] = lambda _: False
) -> list[str]:
    problems = []
    for name, entry in manifest["files"].items():
        if skip(name):
            continue
        file = path / name
        if not file.is_file():
            problems.append(f"missing file {name}")
        elif file.stat().st_size != entry["bytes"]:
            problems.append(
                f"{name}: {file.stat().st_size} bytes, the manifest says {entry['bytes']}"
            )
        elif sha256_file(file) != entry["sha256"]:
            problems.append(f"{name}: sha256 differs from the manifest (file changed)")
    return problems


def verify_artifact(path: Path, *, key: bytes | None = None) -> dict[str, Any]:
    """Check the manifest's seal and every file's sha256 against it, and with `key` the
    manifest's signature; raise ArtifactError on any difference."""
    manifest = read_manifest(path)
    problems = _listed_file_problems(path, manifest)
    allowed = set(manifest["files"]) | ANNEX_FILES | {MANIFEST}
    problems += [f"unlisted file {p.name}" for p in sorted(path.iterdir()) if p.name not in allowed]
    if problems:
        raise ArtifactError(
            f"{path}: artifact does not match its manifest:\n  " + "\n  ".join(problems)
        )
    if key is not None:
        check_signature(path, key)
    return manifest


def publish(source: Path, destination: Path, *, key: bytes | None = None) -> dict[str, Any]:
    """Move a judged artifact into its verdict folder, replacing what is there, only once it
    verifies in full: a sealed artifact is never replaced by an incomplete or unjudged one."""
    manifest = verify_artifact(source, key=key)
    if manifest.get("verdict") is None:
        raise ArtifactError(f"{source}: no sealed verdict; only a judged artifact is published")
    replace_dir(source, destination)
    return manifest


def describe_artifact(path: Path) -> dict[str, Any]:
    """What `compress inspect` prints: provenance, schemes, sizes, files."""
    manifest = read_manifest(path)
    config = read_json_file(path / "config.json")
    if not isinstance(config, dict):
        raise ArtifactError(f"{path / 'config.json'}: not a JSON object")
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
        "allocation": _allocation(qconfig) if len(schemes) > 1 else None,
        "unquantized_linear": qconfig.get("ignore", []),
        "stages": [s.get("summary") for s in manifest.get("stages") or [] if isinstance(s, dict)],
        "verdict": (manifest.get("verdict") or {}).get("verdict"),
        "files": manifest["files"],
        "total_bytes": sum(f["bytes"] for f in manifest["files"].values()),
    }


def _allocation(qconfig: dict[str, Any]) -> dict[str, str]:
    """{layer: scheme name} of a mixed-precision artifact, from the exact-name targets we
    write (`re:^<escaped name>$`)."""
    allocation = {}
    for group in qconfig.get("config_groups", {}).values():
        spec = spec_from_args(group["weights"])
        name = scheme_name(spec.bits, spec.group_size, spec.symmetric)
        for target in group["targets"]:
            layer = re.sub(r"\\(.)", r"\1", target.removeprefix("re:^").removesuffix("$"))
            allocation[layer] = name
    return allocation


# --------------------------------------------------------------------------- load


def _expert_projection_names(model: nn.Module) -> dict[str, list[str]]:
    """Per fused experts module of `model`, the names its quantized projections are stored
    under (`<experts>.<e>.gate_proj`, ...; compress/quant/experts.py)."""
    return {
        name: [
            f"{name}.{e}.{projection}"
            for e in range(module.gate_up_proj.shape[0])
            for projection in projection_names(module)
        ]
        for name, module in model.named_modules()
        if holds_3d_weights(module) and layout_problem(module) is None
    }


def _quantize_experts_modules(
    model: nn.Module, specs: dict[str, QuantSpec], dtype: torch.dtype, path: Path
) -> None:
    """Put an empty QuantExperts wherever the config quantizes an experts module's projections:
    all of them, or none (a partly quantized experts module is no layout we write)."""
    for name, projections in _expert_projection_names(model).items():
        targeted = [p for p in projections if p in specs]
        if not targeted:
            continue
        if len(targeted) != len(projections):
            missing = sorted(set(projections) - set(targeted))
            raise ArtifactError(
                f"{path / 'config.json'}: quantization_config quantizes {len(targeted)} of the "
                f"{len(projections)} expert projections of {name} (missing {missing[:3]})"
            )
        module = model.get_submodule(name)
        quantized = QuantExperts.empty_like(module, _specs_under(specs, name), dtype)
        replace_module(model, name, quantized)


def _specs_under(specs: dict[str, QuantSpec], prefix: str) -> Callable[[str], QuantSpec]:
    return lambda key: specs[f"{prefix}.{key}"]


def build_model(path: Path, dtype: torch.dtype) -> nn.Module:
    """An empty model of the artifact's architecture with QuantLinear (and QuantExperts for
    fused MoE experts) where the config says."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError) as exc:
        raise ArtifactError(
            f"{path / 'config.json'}: not a config transformers reads: {exc}"
        ) from None
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
        expert_names = [n for ns in _expert_projection_names(model).values() for n in ns]
        specs = layer_specs(qconfig, linear_names + expert_names)
        _quantize_experts_modules(model, specs, dtype, path)
        for name, spec in specs.items():
            if name not in linear_names:
                continue  # an expert projection, rebuilt above
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
    dtype = DTYPES[manifest.get("dtype") or "float32"]
    model = build_model(path, dtype)
    _load_weights(model, path / WEIGHTS)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(path) if with_tokenizer else None
    return model, tokenizer
