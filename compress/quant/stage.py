"""The `quantize` stage: choose Linear layers, check them, replace them with QuantLinear."""

from __future__ import annotations

import logging
from collections import defaultdict
from fnmatch import fnmatchcase

from torch import nn
from tqdm.auto import tqdm

from compress.errors import PreflightError
from compress.models import DTYPES, decoder_layers_prefix, replace_module
from compress.quant.config import PER_CHANNEL, QuantizeConfig
from compress.quant.linear import QuantLinear
from compress.quant.primitives import QuantSpec
from compress.quant.rtn import rtn_quantize
from compress.registry import StageContext, StageResult, register_stage

log = logging.getLogger(__name__)

# Group sizes suggested when the configured one does not divide every selected layer.
_SUGGESTED_GROUP_SIZES = (16, 32, 64, 96, 128, 192, 256)


def spec_of(config: QuantizeConfig) -> QuantSpec:
    return QuantSpec(bits=config.bits, group_size=config.group_size, symmetric=config.symmetric)


def _matches(name: str, patterns: list[str]) -> bool:
    return any(fnmatchcase(name, pattern) for pattern in patterns)


def select_layers(model: nn.Module, config: QuantizeConfig) -> dict[str, nn.Linear]:
    """Linear layers the stage will quantize, by name. Raises PreflightError on bad patterns."""
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    if config.include is None:
        prefix = decoder_layers_prefix(model) + "."
        chosen = {n: m for n, m in linears.items() if n.startswith(prefix)}
    else:
        already = [
            n
            for n, m in model.named_modules()
            if isinstance(m, QuantLinear) and _matches(n, config.include)
        ]
        if already:
            raise PreflightError(
                f"include matches layers that are already quantized: {already[:5]}"
            )
        unmatched = [p for p in config.include if not any(fnmatchcase(n, p) for n in linears)]
        if unmatched:
            examples = list(linears)[:4]
            raise PreflightError(
                f"include patterns match no Linear layer: {unmatched} (Linear layers look like "
                f"{examples})"
            )
        chosen = {n: m for n, m in linears.items() if _matches(n, config.include)}
    chosen = {n: m for n, m in chosen.items() if not _matches(n, config.exclude)}
    if not chosen:
        raise PreflightError("no Linear layer left to quantize after include/exclude")
    return chosen


def _workable_group_sizes(in_features: set[int], bits: int) -> list[int]:
    return [
        g
        for g in _SUGGESTED_GROUP_SIZES
        if (g * bits) % 32 == 0 and all(k % g == 0 for k in in_features)
    ]


def preflight(model: nn.Module, config: QuantizeConfig) -> None:
    """Every check that can fail, before any weight is touched."""
    layers = select_layers(model, config)
    by_k: dict[int, list[str]] = defaultdict(list)
    for name, layer in layers.items():
        by_k[layer.in_features].append(name)
    unpackable = {k: names for k, names in by_k.items() if (k * config.bits) % 32}
    if unpackable:
        raise PreflightError(
            _describe_layers(
                f"in_features not a multiple of {32 // config.bits} cannot be packed at "
                f"{config.bits} bits",
                unpackable,
            )
        )
    if config.group_size != PER_CHANNEL:
        bad = {k: names for k, names in by_k.items() if k % config.group_size}
        if bad:
            workable = _workable_group_sizes(set(by_k), config.bits)
            raise PreflightError(
                _describe_layers(f"group_size {config.group_size} does not divide in_features", bad)
                + f"\n  group sizes that divide every selected layer: {[*workable, PER_CHANNEL]}"
                + " (-1 = per channel)"
            )


def _describe_layers(problem: str, by_k: dict[int, list[str]]) -> str:
    lines = [f"quantize: {problem}:"]
    for k, names in sorted(by_k.items()):
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        lines.append(f"  in_features={k}: {shown}")
    return "\n".join(lines)


@register_stage(QuantizeConfig, preflight=preflight)
def quantize_model(model: nn.Module, config: QuantizeConfig, context: StageContext) -> StageResult:
    spec = spec_of(config)
    scale_dtype = DTYPES[context.dtype]
    layers = select_layers(model, config)
    bytes_before = bytes_after = 0
    for name, layer in tqdm(layers.items(), desc=f"quantize {config.scheme}", unit="layer"):
        packed = rtn_quantize(layer.weight.detach(), spec, scale_dtype)
        bias = None if layer.bias is None else layer.bias.detach()
        quantized = QuantLinear.from_packed(packed, spec, bias, layer.weight.dtype)
        bytes_before += sum(p.numel() * p.element_size() for p in layer.parameters())
        bytes_after += quantized.stored_bytes()
        replace_module(model, name, quantized)
    log.info(
        "quantized %d layers to %s: %.1f MB → %.1f MB",
        len(layers),
        config.scheme,
        bytes_before / 1e6,
        bytes_after / 1e6,
    )
    return StageResult(
        summary=f"{len(layers)} Linear layers → {config.scheme} ({config.method})",
        details={
            "scheme": config.scheme,
            "method": config.method,
            "layers": len(layers),
            "bytes_before": bytes_before,
            "bytes_after": bytes_after,
            "ratio": bytes_after / bytes_before,
        },
    )
