"""The `quantize` stage: choose Linear layers and MoE experts, check them, replace them with
QuantLinear and QuantExperts, and report the share of the decoder's weights now quantized."""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from compress.errors import PreflightError
from compress.models import DTYPES, replace_module
from compress.quant.config import QuantizeConfig, scheme_name
from compress.quant.experts import (
    ExpertsCalibration,
    QuantExperts,
    RoutedBatch,
    quantize_experts_gptq,
    quantize_experts_rtn,
)
from compress.quant.gptq import GPTQResult, accumulate_hessian
from compress.quant.linear import QuantLinear
from compress.quant.packing import PackedWeight
from compress.quant.plan import (
    Selection,
    decoder_weights,
    gptq_as_configured,
    module_specs,
    preflight,
    range_search_of,
    select_targets,
)
from compress.quant.primitives import QuantSpec
from compress.quant.rtn import rtn_quantize
from compress.quant.sequential import quantize_sequentially
from compress.registry import StageContext, StageResult, register_stage

log = logging.getLogger(__name__)


def _quantize_rtn(
    model: nn.Module,
    selection: Selection,
    config: QuantizeConfig,
    specs: dict[str, QuantSpec],
    scale_dtype: torch.dtype,
) -> dict[str, float]:
    search = range_search_of(config)
    for name, layer in tqdm(selection.linears.items(), desc="quantize (rtn)", unit="layer"):
        packed = rtn_quantize(layer.weight.detach(), specs[name], scale_dtype, search=search)
        replace_module(model, name, _quant_linear(layer, packed, specs[name]))

    for name, module in tqdm(selection.experts.items(), desc="quantize experts", unit="layer"):
        spec = specs[name]

        def rtn(_key: str, weight: torch.Tensor, spec: QuantSpec = spec) -> PackedWeight:
            return rtn_quantize(weight, spec, scale_dtype, search=search)

        replace_module(model, name, quantize_experts_rtn(module, spec, rtn))
    return {}


def _quantize_gptq(
    model: nn.Module,
    selection: Selection,
    config: QuantizeConfig,
    specs: dict[str, QuantSpec],
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

    def run_gptq(
        name: str, weight: torch.Tensor, hessian: torch.Tensor, spec: QuantSpec
    ) -> GPTQResult:
        nonlocal raised_damp, dead
        result = gptq_as_configured(config, weight, hessian, spec, scale_dtype)
        errors.append(result.error)
        raised_damp += result.damp > options.damp_percent
        dead += result.dead_columns
        log.debug("gptq %s: error %.4g, damp %.3g", name, result.error, result.damp)
        return result

    def quantize(name: str, layer: nn.Linear, hessian: torch.Tensor, _rows: int) -> nn.Module:
        spec = specs[name]
        packed = run_gptq(name, layer.weight.detach(), hessian, spec).packed
        return _quant_linear(layer, packed, spec)

    calibrations: dict[str, ExpertsCalibration] = {}

    def quantize_experts(name: str, module: nn.Module, routed: list[RoutedBatch]) -> nn.Module:
        spec = specs[name]
        quantized, calibrations[name] = quantize_experts_gptq(
            module,
            routed,
            spec,
            accumulate=accumulate_hessian,
            gptq=lambda key, w, h, _rows: run_gptq(f"{name}.{key}", w, h, spec).packed,
            rtn=lambda _key, w: rtn_quantize(w, spec, scale_dtype, search=search),
            min_tokens_per_feature=options.expert_min_tokens_per_feature,
        )
        return quantized

    replaced = quantize_sequentially(
        model,
        selection.linears,
        windows,
        batch_size=context.calibration_batch_size,
        accumulate=accumulate_hessian,
        quantize=quantize,
        device=context.calibration_device,
        experts=selection.experts,
        quantize_experts=quantize_experts,
    )
    expected = len(selection.linears) + len(selection.experts)
    if replaced != expected:
        raise RuntimeError(f"gptq replaced {replaced} of {expected} selected modules")
    return {
        "calibration_tokens": int(windows.numel()),
        "calibration_device": str(context.calibration_device),
        "gptq_error_mean": sum(errors) / len(errors) if errors else 0.0,
        "gptq_error_max": max(errors, default=0.0),
        "layers_with_raised_damp": int(raised_damp),
        "dead_input_columns": int(dead),
        **_experts_calibration_details(calibrations, options.expert_min_tokens_per_feature),
    }


def _experts_calibration_details(
    calibrations: dict[str, ExpertsCalibration], min_tokens_per_feature: float
) -> dict[str, Any]:
    """Routed-token counts and the experts' matrices that fell back to round to nearest."""
    if not calibrations:
        return {}
    tokens = [t for c in calibrations.values() for t in c.tokens]
    fallback = {name: c.rtn_fallback for name, c in calibrations.items() if c.rtn_fallback}
    count = sum(len(v) for v in fallback.values())
    if count:
        log.warning(
            "gptq: %d of %d expert matrices saw fewer than %g tokens per input feature and "
            "were rounded to nearest: %s",
            count,
            3 * len(tokens),
            min_tokens_per_feature,
            "; ".join(f"{name}: {', '.join(keys)}" for name, keys in fallback.items()),
        )
    return {
        "expert_tokens_min": min(tokens),
        "expert_tokens_max": max(tokens),
        "expert_tokens_mean": sum(tokens) / len(tokens),
        "expert_matrices_rtn_fallback": count,
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


def _quant_experts(model: nn.Module, selection: Selection) -> list[QuantExperts]:
    return [model.get_submodule(name) for name in selection.experts]  # type: ignore[misc]


def _weight_shares(before: dict, after: dict) -> dict[str, float]:
    """Shares of the decoder's weight-matrix parameters (Linear weights, experts' matrices,
    routers; by parameter count): quantized by this stage, and quantized now (earlier stages
    included). Before and after are `decoder_weights` of the model."""
    total = sum(entry.numel for entry in before.values())
    was = sum(e.numel for e in before.values() if e.kind == "quantized")
    now = sum(e.numel for e in after.values() if e.kind == "quantized")
    return {
        "quantized_weight_share": now / total if total else 0.0,
        "stage_weight_share": (now - was) / total if total else 0.0,
    }


def _scheme_counts(specs: dict[str, QuantSpec]) -> dict[str, int]:
    """{scheme name: modules quantized to it}, most used first."""
    counts = Counter(scheme_name(s.bits, s.group_size, s.symmetric) for s in specs.values())
    return dict(counts.most_common())


def _describe_schemes(counts: dict[str, int]) -> str:
    if len(counts) == 1:
        return next(iter(counts))
    return "mixed (" + ", ".join(f"{n} × {scheme}" for scheme, n in counts.items()) + ")"


def _param_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


@register_stage(QuantizeConfig, preflight=preflight)
def quantize_model(model: nn.Module, config: QuantizeConfig, context: StageContext) -> StageResult:
    scale_dtype = DTYPES[context.dtype]
    selection = select_targets(model, config)
    specs = module_specs(config, selection)
    layers = selection.linears
    names = [*layers, *selection.experts]
    bytes_before = sum(_param_bytes(model.get_submodule(name)) for name in names)
    before = decoder_weights(model)
    if config.method == "gptq":
        extra = _quantize_gptq(model, selection, config, specs, scale_dtype, context)
    else:
        extra = _quantize_rtn(model, selection, config, specs, scale_dtype)
    tied_table = _share_quantized_head_with_embeddings(model, layers)
    bytes_after = sum(model.get_submodule(name).stored_bytes() for name in names)
    shares = _weight_shares(before, decoder_weights(model))
    schemes = _scheme_counts(specs)
    experts_part = (
        f" and {len(selection.experts)} experts modules "
        f"({sum(m.num_experts for m in _quant_experts(model, selection))} experts)"
        if selection.experts
        else ""
    )
    log.info(
        "quantized %d Linear layers%s to %s (%s): %.1f MB → %.1f MB; %.1f%% of the decoder's "
        "weight matrices are quantized",
        len(layers),
        experts_part,
        _describe_schemes(schemes),
        config.method,
        bytes_before / 1e6,
        bytes_after / 1e6,
        100 * shares["quantized_weight_share"],
    )
    return StageResult(
        summary=f"{len(layers)} Linear layers{experts_part} → {_describe_schemes(schemes)} "
        f"({config.method}, {config.observer} ranges); "
        f"{100 * shares['quantized_weight_share']:.1f}% of decoder weights quantized",
        details={
            "scheme": next(iter(schemes)) if len(schemes) == 1 else "mixed",
            "schemes": schemes,
            "method": config.method,
            "observer": config.observer,
            "layers": len(layers),
            "experts_modules": len(selection.experts),
            **shares,
            "bytes_before": bytes_before,
            "bytes_after": bytes_after,
            "ratio": bytes_after / bytes_before,
            "embeddings_from_quantized_lm_head": tied_table,
            **extra,
        },
    )
