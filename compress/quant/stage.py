"""The `quantize` stage: choose Linear layers, check them, replace them with QuantLinear."""

from __future__ import annotations

import logging

import torch
from torch import nn
from tqdm.auto import tqdm

from compress.errors import PreflightError
from compress.models import DTYPES, replace_module
from compress.quant.config import QuantizeConfig
from compress.quant.gptq import accumulate_hessian, gptq_quantize
from compress.quant.linear import QuantLinear
from compress.quant.packing import PackedWeight
from compress.quant.plan import preflight, range_search_of, select_layers, spec_of
from compress.quant.primitives import QuantSpec
from compress.quant.rtn import rtn_quantize
from compress.quant.sequential import quantize_sequentially
from compress.registry import StageContext, StageResult, register_stage

log = logging.getLogger(__name__)


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
