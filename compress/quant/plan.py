"""What a quantize stage will do, checked before any weight is touched: which Linear layers
it selects, whether their shapes take its scheme (naming the layers and the setting at fault),
and the config's scheme as the quantizer's own types. The distill stage's QAT shares these, so
they live here rather than in the stage."""

from __future__ import annotations

import logging
from collections import defaultdict
from fnmatch import fnmatchcase

from torch import nn

from compress.errors import PreflightError
from compress.kernels import CUDA_GEMV_MAX_ROWS, mma_slice, mma_takes_shape
from compress.models import decoder_layers_prefix
from compress.quant.config import PER_CHANNEL, QuantizeConfig
from compress.quant.linear import QuantLinear
from compress.quant.primitives import QuantSpec, RangeSearch

log = logging.getLogger(__name__)

# Group sizes suggested when the configured one does not divide every selected layer.
_SUGGESTED_GROUP_SIZES = (16, 32, 64, 96, 128, 192, 256)


def spec_of(config: QuantizeConfig) -> QuantSpec:
    return QuantSpec(bits=config.bits, group_size=config.group_size, symmetric=config.symmetric)


def range_search_of(config: QuantizeConfig) -> RangeSearch | None:
    return RangeSearch() if config.observer == "mse" else None


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
                f"{examples})",
                field="include",
            )
        chosen = {n: m for n, m in linears.items() if _matches(n, config.include)}
    chosen = {n: m for n, m in chosen.items() if not _matches(n, config.exclude)}
    if not chosen:
        raise PreflightError(
            "no Linear layer left to quantize after include/exclude", field="exclude"
        )
    return chosen


def _workable_group_sizes(in_features: set[int], bits: int) -> list[int]:
    return [
        g
        for g in _SUGGESTED_GROUP_SIZES
        if (g * bits) % 32 == 0 and all(k % g == 0 for k in in_features)
    ]


def _off_tensor_cores(
    by_k: dict[int, list[str]], bits: int, group_size: int
) -> dict[int, list[str]]:
    return {k: names for k, names in by_k.items() if not mma_takes_shape(bits, group_size, k)}


def preflight(model: nn.Module, config: QuantizeConfig) -> None:
    """Every check that can fail, before any weight is touched."""
    layers = select_layers(model, config)
    if config.method == "gptq":
        prefix = decoder_layers_prefix(model) + "."
        outside = sorted(n for n in layers if not n.startswith(prefix))
        if outside:
            raise PreflightError(
                f"method gptq calibrates Linear layers inside the decoder layers ({prefix}*); "
                f"{outside} are outside: quantize them in a separate `method: rtn` stage"
            )
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
            ),
            field="bits",
        )
    if config.group_size != PER_CHANNEL:
        bad = {k: names for k, names in by_k.items() if k % config.group_size}
        if bad:
            workable = [*_workable_group_sizes(set(by_k), config.bits), PER_CHANNEL]
            fast = [g for g in workable if not _off_tensor_cores(by_k, config.bits, g)]
            raise PreflightError(
                _describe_layers(f"group_size {config.group_size} does not divide in_features", bad)
                + f"\n  group sizes that divide every selected layer: {workable} (-1 = per channel)"
                + f"; of these, CUDA's tensor-core kernel takes every layer at {fast or 'none'}",
                field="group_size",
            )
    _warn_off_tensor_cores(by_k, config)


def _warn_off_tensor_cores(by_k: dict[int, list[str]], config: QuantizeConfig) -> None:
    """Say before the long work, not at deployment, which layers CUDA will not run on the tensor
    cores: the artifact is valid, but those layers decode on slower paths."""
    off = _off_tensor_cores(by_k, config.bits, config.group_size)
    if off:
        slice_k = mma_slice(config.bits)
        log.warning(
            "%s\n  on CUDA these run on the CUDA-core GEMV up to %d rows and dequantize + cuBLAS "
            "above, not on the tensor cores",
            _describe_layers(
                f"in_features and group size must be multiples of {slice_k} for CUDA's "
                f"tensor-core kernel at {config.bits} bits (group_size {config.group_size})",
                off,
            ),
            CUDA_GEMV_MAX_ROWS,
        )


def _describe_layers(problem: str, by_k: dict[int, list[str]]) -> str:
    lines = [f"quantize: {problem}:"]
    for k, names in sorted(by_k.items()):
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        lines.append(f"  in_features={k}: {shown}")
    return "\n".join(lines)
