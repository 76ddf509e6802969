"""The `quantize` stage: choose Linear layers, check them, replace them with QuantLinear."""

from __future__ import annotations

import logging
from collections import defaultdict
from fnmatch import fnmatchcase

import torch
from torch import nn
from tqdm.auto import tqdm

from compress.errors import PreflightError
from compress.kernels import CUDA_GEMV_MAX_ROWS, mma_slice, mma_takes_shape
from compress.models import DTYPES, decoder_layers_prefix, replace_module
from compress.quant.config import PER_CHANNEL, QuantizeConfig
from compress.quant.gptq import accumulate_hessian, gptq_quantize
from compress.quant.linear import QuantLinear
from compress.quant.packing import PackedWeight
from compress.quant.primitives import QuantSpec, RangeSearch
from compress.quant.rtn import rtn_quantize
from compress.quant.sequential import quantize_sequentially
from compress.registry import StageContext, StageResult, register_stage

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
            )
        )
    if config.group_size != PER_CHANNEL:
        bad = {k: names for k, names in by_k.items() if k % config.group_size}
        if bad:
            workable = [*_workable_group_sizes(set(by_k), config.bits), PER_CHANNEL]
            fast = [g for g in workable if not _off_tensor_cores(by_k, config.bits, g)]
            raise PreflightError(
                _describe_layers(f"group_size {config.group_size} does not divide in_features", bad)
                + f"\n  group sizes that divide every selected layer: {workable} (-1 = per channel)"
                + f"; of these, CUDA's tensor-core kernel takes every layer at {fast or 'none'}"
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


def _quantize_rtn(
    model: nn.Module,
    layers: dict[str, nn.Linear],
    config: QuantizeConfig,
    spec: QuantSpec,
    scale_dtype: torch.dtype,
) -> dict[str, float]:
    search = range_search_of(config)
    for name, layer in tqdm(layers.items(), desc="quantize (rtn)", unit="layer"):
        packed = rtn_quantize(layer.weight.detach(), spec, scale_dtype, search=search)
        replace_module(model, name, _quant_linear(layer, packed, spec))
    return {}


def _quantize_gptq(
    model: nn.Module,
    layers: dict[str, nn.Linear],
    config: QuantizeConfig,
    spec: QuantSpec,
    scale_dtype: torch.dtype,
    context: StageContext,
) -> dict[str, float]:
    if context.calibration_windows is None:
        raise PreflightError("method gptq needs calibration windows (recipe `calibration`)")
    windows = context.calibration_windows()  # (num_samples, seq_len)
    options = config.gptq_options
    search = range_search_of(config)
    errors: list[float] = []
    raised_damp = dead = 0

    def quantize(name: str, layer: nn.Linear, hessian: torch.Tensor, _rows: int) -> nn.Module:
        nonlocal raised_damp, dead
        result = gptq_quantize(
            layer.weight.detach(),
            hessian,
            spec,
            scale_dtype,
            block_size=options.block_size,
            damp_percent=options.damp_percent,
            act_order=options.act_order,
            search=search,
        )
        errors.append(result.error)
        raised_damp += result.damp > options.damp_percent
        dead += result.dead_columns
        log.debug("gptq %s: error %.4g, damp %.3g", name, result.error, result.damp)
        return _quant_linear(layer, result.packed, spec)

    replaced = quantize_sequentially(
        model,
        layers,
        windows,
        batch_size=context.calibration_batch_size,
        accumulate=accumulate_hessian,
        quantize=quantize,
        device=context.calibration_device,
    )
    if replaced != len(layers):
        raise RuntimeError(f"gptq replaced {replaced} of {len(layers)} selected layers")
    return {
        "calibration_tokens": int(windows.numel()),
        "calibration_device": str(context.calibration_device),
        "gptq_error_mean": sum(errors) / len(errors),
        "gptq_error_max": max(errors),
        "layers_with_raised_damp": int(raised_damp),
        "dead_input_columns": int(dead),
    }


def _quant_linear(layer: nn.Linear, packed: PackedWeight, spec: QuantSpec) -> QuantLinear:
    bias = None if layer.bias is None else layer.bias.detach()
    return QuantLinear.from_packed(packed, spec, bias, layer.weight.dtype)


def _share_quantized_head_with_embeddings(
    model: nn.Module, quantized: dict[str, nn.Linear]
) -> bool:
    """When a tied lm_head was quantized, the input embeddings take its dequantized table.

    A tied model has one table for both ends. Quantizing only the head would silently untie
    them (the embeddings keep the float table, the head computes with another); instead both
    use the quantized values, as llama.cpp does with a tied `token_embd`, so the gate judges the
    model a runtime that stores the table once (the ONNX export's GatherBlockQuantized) runs.
    The config is untied because the head is no longer a plain weight the loader could tie.
    """
    config = getattr(model, "config", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not (getattr(config, "tie_word_embeddings", False) and isinstance(head, QuantLinear)):
        return False
    names = {id(m): n for n, m in model.named_modules()}
    if names.get(id(head)) not in quantized:
        return False
    embeddings = model.get_input_embeddings()
    with torch.no_grad():
        table = head.dequantized_weight().to(embeddings.weight.dtype)
    embeddings.weight = nn.Parameter(table, requires_grad=False)
    config.tie_word_embeddings = False
    log.info(
        "%s was tied to the input embeddings: both now use its quantized table",
        names[id(head)],
    )
    return True


def _param_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


@register_stage(QuantizeConfig, preflight=preflight)
def quantize_model(model: nn.Module, config: QuantizeConfig, context: StageContext) -> StageResult:
    spec = spec_of(config)
    scale_dtype = DTYPES[context.dtype]
    layers = select_layers(model, config)
    bytes_before = sum(_param_bytes(layer) for layer in layers.values())
    if config.method == "gptq":
        extra = _quantize_gptq(model, layers, config, spec, scale_dtype, context)
    else:
        extra = _quantize_rtn(model, layers, config, spec, scale_dtype)
    tied_table = _share_quantized_head_with_embeddings(model, layers)
    bytes_after = sum(model.get_submodule(name).stored_bytes() for name in layers)
    log.info(
        "quantized %d layers to %s (%s): %.1f MB → %.1f MB",
        len(layers),
        config.scheme,
        config.method,
        bytes_before / 1e6,
        bytes_after / 1e6,
    )
    return StageResult(
        summary=f"{len(layers)} Linear layers → {config.scheme} "
        f"({config.method}, {config.observer} ranges)",
        details={
            "scheme": config.scheme,
            "method": config.method,
            "observer": config.observer,
            "layers": len(layers),
            "bytes_before": bytes_before,
            "bytes_after": bytes_after,
            "ratio": bytes_after / bytes_before,
            "embeddings_from_quantized_lm_head": tied_table,
            **extra,
        },
    )
