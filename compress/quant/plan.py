"""What a quantize stage will do, checked before any weight is touched: which Linear layers and
fused MoE experts modules it selects, whether their shapes take its scheme (naming the layers
and the setting at fault), that no decoder weight matrix is left unquantized without the recipe
saying so, and the config's scheme as the quantizer's own types. The distill stage's QAT shares
these, so they live here rather than in the stage."""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass
from fnmatch import fnmatchcase

import torch
from torch import nn

from compress.errors import PreflightError
from compress.kernels import CUDA_GEMV_MAX_ROWS, mma_slice, mma_takes_shape
from compress.models import decoder_layers_prefix
from compress.quant import experts
from compress.quant.config import PER_CHANNEL, LayerScheme, QuantizeConfig
from compress.quant.experts import QuantExperts
from compress.quant.gptq import GPTQResult, gptq_quantize
from compress.quant.linear import QuantLinear
from compress.quant.primitives import QuantSpec, RangeSearch

log = logging.getLogger(__name__)

# Group sizes suggested when the configured one does not divide every selected layer.
_SUGGESTED_GROUP_SIZES = (16, 32, 64, 96, 128, 192, 256)


def spec_of(config: QuantizeConfig | LayerScheme, *, fp16_exact: bool = False) -> QuantSpec:
    """The stage's own scheme (or one override's) as the quantizer's type."""
    return QuantSpec(
        bits=config.bits,
        group_size=config.group_size,
        symmetric=config.symmetric,
        fp16_exact=fp16_exact,
    )


def module_specs(config: QuantizeConfig, selection: Selection) -> dict[str, QuantSpec]:
    """Each selected Linear and experts module's scheme: the override whose `match` names it,
    else the stage's own. Raises PreflightError, naming the override, when a pattern matches no
    selected layer or two overrides match one layer."""
    names = [*selection.linears, *selection.experts]
    specs = dict.fromkeys(names, spec_of(config, fp16_exact=config.gguf_exact))
    claimed: dict[str, int] = {}
    for index, override in enumerate(config.overrides):
        field = f"overrides.{index}.match"
        unmatched = [p for p in override.match if not any(fnmatchcase(n, p) for n in names)]
        if unmatched:
            raise PreflightError(
                f"patterns match no layer this stage quantizes: {unmatched} (names look like "
                f"{names[:3]})",
                field=field,
            )
        for name in (n for n in names if _matches(n, override.match)):
            if name in claimed:
                raise PreflightError(
                    f"{name} is matched by overrides {claimed[name]} and {index}: give each "
                    "layer one scheme",
                    field=field,
                )
            claimed[name] = index
            specs[name] = spec_of(override, fp16_exact=config.gguf_exact)
    return specs


def range_search_of(config: QuantizeConfig) -> RangeSearch | None:
    return RangeSearch() if config.observer == "mse" else None


def gptq_as_configured(
    config: QuantizeConfig,
    weight: torch.Tensor,
    hessian: torch.Tensor,
    spec: QuantSpec,
    scale_dtype: torch.dtype,
) -> GPTQResult:
    """`gptq_quantize` with the stage's GPTQ options and observer."""
    options = config.gptq_options
    return gptq_quantize(
        weight,
        hessian,
        spec,
        scale_dtype,
        block_size=options.block_size,
        damp_percent=options.damp_percent,
        act_order=options.act_order,
        search=range_search_of(config),
    )


def _matches(name: str, patterns: list[str]) -> bool:
    return any(fnmatchcase(name, pattern) for pattern in patterns)


@dataclass(frozen=True)
class Selection:
    """What a quantize stage will quantize: Linear layers and fused experts modules, by name."""

    linears: dict[str, nn.Linear]
    experts: dict[str, nn.Module]


@dataclass(frozen=True)
class WeightMatrix:
    """One weight matrix of the decoder layers: its module, size and what it is."""

    module: str
    numel: int
    # linear | experts (fused, quantizable) | router | quantized (by an earlier stage) |
    # unsupported (experts of a layout we cannot quantize) | other (a matrix in no Linear)
    kind: str
    note: str = ""


def _routers(model: nn.Module, prefix: str) -> set[str]:
    """Siblings of every experts module that score experts (experts.is_router)."""
    found = set()
    for name, module in model.named_modules():
        if not name.startswith(prefix):
            continue
        if isinstance(module, QuantExperts):  # quantized by an earlier stage: still scored
            num_experts = module.num_experts
        elif experts.holds_3d_weights(module):
            num_experts = next(p for p in module.parameters(recurse=False) if p.ndim == 3).shape[0]
        else:
            continue
        parent_name = name.rpartition(".")[0]
        for child, sibling in model.get_submodule(parent_name).named_children():
            if sibling is not module and experts.is_router(sibling, num_experts):
                found.add(f"{parent_name}.{child}")
    return found


def decoder_weights(model: nn.Module) -> dict[str, WeightMatrix]:
    """Every weight matrix (≥ 2-D floating parameter, or a quantized Linear's weight) inside the
    decoder layers, by parameter name. Shapes only: works on a weightless (meta) model."""
    prefix = decoder_layers_prefix(model) + "."
    routers = _routers(model, prefix)
    found: dict[str, WeightMatrix] = {}
    for name, module in model.named_modules():
        if not name.startswith(prefix):
            continue
        if isinstance(module, QuantLinear):
            size = module.in_features * module.out_features
            found[f"{name}.weight"] = WeightMatrix(name, size, "quantized")
            continue
        fused = experts.holds_3d_weights(module)
        problem = experts.layout_problem(module) if fused else None
        for param_name, param in module.named_parameters(recurse=False):
            if param.ndim < 2 or not param.is_floating_point():
                continue  # norms, biases, scalars
            if name in routers:
                kind, note = "router", f"router {type(module).__name__}"
            elif fused:
                kind = "unsupported" if problem else "experts"
                note = f"{type(module).__name__}: {problem}" if problem else ""
            elif isinstance(module, nn.Linear):
                kind, note = "linear", ""
            else:
                kind, note = "other", f"{tuple(param.shape)} in a {type(module).__name__}"
            found[f"{name}.{param_name}"] = WeightMatrix(name, param.numel(), kind, note)
    return found


def select_targets(model: nn.Module, config: QuantizeConfig) -> Selection:
    """Linear layers and fused experts modules the stage will quantize. Raises PreflightError
    on bad patterns.

    By default every Linear and every experts module inside the decoder layers; MoE routers
    (`experts.is_router`) never. `include` / `exclude` patterns match module names; an experts
    module is selected or excluded as a whole (`model.layers.0.mlp.experts`).
    """
    prefix = decoder_layers_prefix(model) + "."
    routers = _routers(model, prefix)
    linears = {
        n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in routers
    }
    fused = {
        n: m
        for n, m in model.named_modules()
        if n.startswith(prefix)
        and experts.holds_3d_weights(m)
        and experts.layout_problem(m) is None
    }
    if config.include is None:
        chosen = {n: m for n, m in linears.items() if n.startswith(prefix)}
        chosen_experts = fused
    else:
        already = [
            n
            for n, m in model.named_modules()
            if isinstance(m, (QuantLinear, QuantExperts)) and _matches(n, config.include)
        ]
        if already:
            raise PreflightError(
                f"include matches layers that are already quantized: {already[:5]}"
            )
        names = [*linears, *fused]
        unmatched = [p for p in config.include if not any(fnmatchcase(n, p) for n in names)]
        if unmatched:
            examples = list(linears)[:4] + list(fused)[:1]
            raise PreflightError(
                f"include patterns match no Linear layer: {unmatched} (nor an experts module; "
                f"names look like {examples})",
                field="include",
            )
        chosen = {n: m for n, m in linears.items() if _matches(n, config.include)}
        chosen_experts = {n: m for n, m in fused.items() if _matches(n, config.include)}
    chosen = {n: m for n, m in chosen.items() if not _matches(n, config.exclude)}
    chosen_experts = {n: m for n, m in chosen_experts.items() if not _matches(n, config.exclude)}
    if not chosen and not chosen_experts:
        raise PreflightError(
            "no Linear layer left to quantize after include/exclude", field="exclude"
        )
    return Selection(chosen, chosen_experts)


def select_layers(model: nn.Module, config: QuantizeConfig) -> dict[str, nn.Linear]:
    """The Linear layers of `select_targets` (QAT fake-quantizes Linears only)."""
    return select_targets(model, config).linears


def left_out(
    model: nn.Module, config: QuantizeConfig, selection: Selection
) -> dict[str, WeightMatrix]:
    """Decoder weight matrices this stage would leave in the source dtype without the recipe
    saying so: experts modules not selected, experts of a layout we cannot quantize, and
    matrices in modules that are not Linear, unless `exclude` names their module or the
    parameter. Linear layers a custom `include` leaves out are a choice (a later stage may
    quantize them at another precision), and routers stay 16-bit by design."""
    found = {}
    for param, entry in decoder_weights(model).items():
        if entry.kind not in ("experts", "unsupported", "other"):
            continue
        if entry.kind == "experts" and entry.module in selection.experts:
            continue
        if _matches(entry.module, config.exclude) or _matches(param, config.exclude):
            continue
        found[param] = entry
    return found


def _describe_left_out(found: dict[str, WeightMatrix]) -> str:
    by_module: dict[str, list[str]] = defaultdict(list)
    for param, entry in found.items():
        by_module[entry.module].append(param.rpartition(".")[2])
    lines = ["quantize: decoder weights would be left in the source dtype, unquantized:"]
    for module, params in list(by_module.items())[:6]:
        entry = next(e for e in found.values() if e.module == module)
        why = {
            "experts": "experts not matched by include",
            "unsupported": f"cannot be quantized: {entry.note}",
            "other": f"not a Linear layer: {entry.note}",
        }[entry.kind]
        lines.append(f"  {module} ({', '.join(params)}): {why}")
    if len(by_module) > 6:
        lines.append(f"  and {len(by_module) - 6} more modules")
    lines.append(
        "  select them with `include`, or name them in `exclude` to keep them unquantized "
        "on purpose"
    )
    return "\n".join(lines)


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
    selection = select_targets(model, config)
    found = left_out(model, config, selection)
    if found:
        raise PreflightError(_describe_left_out(found), field="include")
    layers = selection.linears
    if config.method == "gptq":
        prefix = decoder_layers_prefix(model) + "."
        outside = sorted(n for n in layers if not n.startswith(prefix))
        if outside:
            raise PreflightError(
                f"method gptq calibrates Linear layers inside the decoder layers ({prefix}*); "
                f"{outside} are outside: quantize them in a separate `method: rtn` stage"
            )
    specs = module_specs(config, selection)
    # (module, what errors call the matrix, in_features) of every matrix to quantize
    matrices = [(name, name, layer.in_features) for name, layer in layers.items()]
    for name, module in selection.experts.items():
        for param, (_experts, _rows, k) in experts.matrix_shapes(module).items():
            matrices.append((name, f"{name}.{param}", k))
    # Check each scheme over the layers that take it; errors name the setting that chose it.
    by_scheme: dict[QuantSpec, dict[int, list[str]]] = defaultdict(lambda: defaultdict(list))
    for module, label, k in matrices:
        by_scheme[specs[module]][k].append(label)
    for spec, by_k in by_scheme.items():
        _check_scheme(spec, by_k, _field_prefix(config, spec))


def _field_prefix(config: QuantizeConfig, spec: QuantSpec) -> str:
    """`` for the stage's own scheme, `overrides.<i>.` for the first override that sets it."""
    if spec == spec_of(config):
        return ""
    index = next(i for i, o in enumerate(config.overrides) if spec_of(o) == spec)
    return f"overrides.{index}."


def _check_scheme(spec: QuantSpec, by_k: dict[int, list[str]], prefix: str) -> None:
    unpackable = {k: names for k, names in by_k.items() if (k * spec.bits) % 32}
    if unpackable:
        raise PreflightError(
            _describe_layers(
                f"in_features not a multiple of {32 // spec.bits} cannot be packed at "
                f"{spec.bits} bits",
                unpackable,
            ),
            field=f"{prefix}bits",
        )
    if spec.group_size != PER_CHANNEL:
        bad = {k: names for k, names in by_k.items() if k % spec.group_size}
        if bad:
            workable = [*_workable_group_sizes(set(by_k), spec.bits), PER_CHANNEL]
            fast = [g for g in workable if not _off_tensor_cores(by_k, spec.bits, g)]
            raise PreflightError(
                _describe_layers(f"group_size {spec.group_size} does not divide in_features", bad)
                + f"\n  group sizes that divide every selected layer: {workable} (-1 = per channel)"
                + f"; of these, CUDA's tensor-core kernel takes every layer at {fast or 'none'}",
                field=f"{prefix}group_size",
            )
    _warn_off_tensor_cores(by_k, spec)


def _warn_off_tensor_cores(by_k: dict[int, list[str]], spec: QuantSpec) -> None:
    """Say before the long work, not at deployment, which layers CUDA will not run on the tensor
    cores: the artifact is valid, but those layers decode on slower paths."""
    off = _off_tensor_cores(by_k, spec.bits, spec.group_size)
    if off:
        slice_k = mma_slice(spec.bits)
        log.warning(
            "%s\n  on CUDA these run on the CUDA-core GEMV up to %d rows and dequantize + cuBLAS "
            "above, not on the tensor cores",
            _describe_layers(
                f"in_features and group size must be multiples of {slice_k} for CUDA's "
                f"tensor-core kernel at {spec.bits} bits (group_size {spec.group_size})",
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
