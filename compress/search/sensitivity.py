"""How much each layer group costs in KL when it alone takes a format: measured, and a proxy.

Groups are the Linear layers that read the same input and are best stored alike (q/k/v,
gate/up); every other decoder Linear the quantize stage selects is a group of its own (MoE
routers are not; experts modules are not measured yet).

- **Measured**: KL(baseline ‖ model) on calibration windows with only that group fake-quantized
  (round to nearest, weights replaced by their dequantized values and restored after): one
  forward pass over the windows per (group, format), against the compact baseline of
  evaluate/quality.py, so the model is never copied.
- **Proxy**: the Hessian-weighted error GPTQ minimizes, tr(ΔW H ΔWᵀ) with H = mean xxᵀ of the
  layer's inputs on the same windows, summed over the group's layers. One forward pass in all;
  how well it ranks (group, format) pairs against the measured KL is `rank_correlation`.
- **Anchored**: one measured format per group (its coarsest, where KL is largest and so best
  resolved), the others scaled by the proxy's ratio within the group. Across groups the proxy
  misses how much later layers amplify an error (ρ ≈ 0.86 on the demo model); within a group
  the amplification is the same for every format, and the ratio is within 0.8–1.35× of the
  measured one there (benchmarks/search.py). One forward pass per group instead of per format.

Measure in float32. In bfloat16 any change to a weight reshuffles the rounding of every later
activation, so each group's KL carries a floor of rounding noise (≈ 1e-3 nats on the demo model,
the KL INT8 per channel shows in bf16, against 2e-5 in float32) that does not add up: summed over
120 groups the floor alone predicts 0.12. In float32 the per-group KLs add up to within 10 % of
the KL measured with every group changed at once (benchmarks/search.py).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from copy import deepcopy
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from compress.evaluate.quality import baseline_logprobs, measure_quality
from compress.quant.config import QuantizeConfig
from compress.quant.linear import QuantLinear
from compress.quant.plan import gptq_as_configured, range_search_of, select_targets
from compress.quant.primitives import QuantSpec, fake_quantize
from compress.quant.rtn import rtn_quantize
from compress.search.candidates import Format, fits

log = logging.getLogger(__name__)

# Sibling projections that read one input and are grouped (fused in the ONNX export, too).
COUPLED = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


@dataclass(frozen=True)
class LayerGroup:
    name: str
    layers: tuple[str, ...]
    output: bool = False  # the output layer (outside the decoder: quantized by its own stage)


def head_group(model: nn.Module) -> LayerGroup | None:
    """The output layer as a group of its own, when it is a float Linear (with tied embeddings
    it holds the one table both ends use)."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if get is not None else None
    if not isinstance(head, nn.Linear):
        return None
    name = next(n for n, m in model.named_modules() if m is head)
    return LayerGroup(name, (name,), output=True)


def layer_groups(model: nn.Module, *, head: bool = False) -> list[LayerGroup]:
    """The decoder's Linear layers in groups (module docstring), in model order; with `head`,
    the output layer last (`head_group`)."""
    # The quantize stage's own default selection: decoder Linears, MoE routers left out.
    linears = list(select_targets(model, QuantizeConfig(bits=8)).linears)
    present = set(linears)
    groups: list[LayerGroup] = []
    taken: set[str] = set()
    for name in linears:
        if name in taken:
            continue
        parent, _, leaf = name.rpartition(".")
        siblings = next((c for c in COUPLED if leaf in c), (leaf,))
        members = tuple(f"{parent}.{s}" for s in siblings if f"{parent}.{s}" in present)
        if len(members) < len(siblings):  # a partial set (pruned away?) is not coupled
            members = (name,)
        taken.update(members)
        label = "_".join(s.removesuffix("_proj") for s in siblings) if len(members) > 1 else leaf
        groups.append(LayerGroup(f"{parent}.{label}", members))
    output = head_group(model) if head else None
    return groups if output is None else [*groups, output]


def group_formats(model: nn.Module, group: LayerGroup, formats: Sequence[Format]) -> list[Format]:
    """The formats every layer of the group can take, in the given order."""
    widths = {model.get_submodule(name).in_features for name in group.layers}
    return [fmt for fmt in formats if all(fits(fmt, k) for k in widths)]


def _spec(fmt: Format) -> QuantSpec:
    return QuantSpec(bits=fmt.bits, group_size=fmt.group_size, symmetric=fmt.symmetric)


# (layer name, weight, format) → the weight the stored layer computes with (float32)
Rounder = Callable[[str, torch.Tensor, Format], torch.Tensor]


def round_to_nearest(_name: str, weight: torch.Tensor, fmt: Format) -> torch.Tensor:
    return fake_quantize(weight, _spec(fmt), weight.dtype)


def stage_rounder(
    config: QuantizeConfig, scale_dtype: torch.dtype, hessians: Callable[[str], torch.Tensor]
) -> Rounder:
    """Rounds as the quantize stage `config` would store the layer: its method (round to
    nearest, or GPTQ with its options on the layer's input Hessian, `hessians(layer)`) and its
    observer, scales in `scale_dtype`. GPTQ here sees the unquantized model's inputs (only one
    group changes at a time), where the stage's sequential pass sees earlier layers quantized."""
    search = range_search_of(config)

    def rounded(name: str, weight: torch.Tensor, fmt: Format) -> torch.Tensor:
        spec = _spec(fmt)
        if config.method == "gptq":
            packed = gptq_as_configured(config, weight, hessians(name), spec, scale_dtype).packed
        else:
            packed = rtn_quantize(weight, spec, scale_dtype, search=search)
        layer = QuantLinear.from_packed(packed, spec, None, scale_dtype)
        return layer.dequantized_weight().float()

    return rounded


@contextlib.contextmanager
def fake_quantized(
    model: nn.Module, layers: Sequence[str], fmt: Format, rounder: Rounder = round_to_nearest
) -> Iterator[None]:
    """The layers compute with their weights rounded to `fmt`; restored exactly on exit."""
    if fmt.bits == 16:
        yield
        return
    saved: dict[str, torch.Tensor] = {}
    try:
        with torch.no_grad():
            for name in layers:
                weight = model.get_submodule(name).weight
                saved[name] = weight.detach().clone()
                rounded = rounder(name, weight.detach(), fmt)
                weight.copy_(rounded.to(weight.dtype))
        yield
    finally:
        with torch.no_grad():
            for name, original in saved.items():
                model.get_submodule(name).weight.copy_(original)


def measured_sensitivity(
    model: nn.Module,
    groups: Sequence[LayerGroup],
    formats: Sequence[Format],
    windows: torch.Tensor,
    *,
    batch_size: int = 1,
    rounder: Rounder = round_to_nearest,
) -> dict[str, dict[str, float]]:
    """{group: {format name: KL(baseline ‖ model with only that group in that format)}}, for
    the formats that fit every layer of the group."""
    baseline = baseline_logprobs(model, windows, batch_size=batch_size)
    table: dict[str, dict[str, float]] = {g.name: {} for g in groups}
    pairs = [(g, f) for g in groups for f in group_formats(model, g, formats)]
    for group, fmt in tqdm(pairs, desc="sensitivity", unit="candidate", disable=None):
        if fmt.bits == 16:
            table[group.name][fmt.name] = 0.0
            continue
        with fake_quantized(model, group.layers, fmt, rounder):
            table[group.name][fmt.name] = measure_quality(model, windows, baseline).kl_divergence
    return table


@torch.no_grad()
def input_hessians(
    model: nn.Module, layers: Sequence[str], windows: torch.Tensor, *, batch_size: int = 1
) -> dict[str, torch.Tensor]:
    """{layer: mean x xᵀ over every token of `windows`} (float32, K × K), one pass."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook(name: str):
        def record(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0].reshape(-1, args[0].shape[-1]).float()
            sums[name] = sums.get(name, 0) + x.T @ x
            counts[name] = counts.get(name, 0) + x.shape[0]

        return record

    handles = [model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in layers]
    try:
        device = model.get_input_embeddings().weight.device
        for start in range(0, len(windows), batch_size):
            model(input_ids=windows[start : start + batch_size].to(device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return {name: sums[name] / counts[name] for name in layers}


def group_hessians(
    model: nn.Module, groups: Sequence[LayerGroup], windows: torch.Tensor, *, batch_size: int = 1
) -> Callable[[str], torch.Tensor]:
    """layer → its input Hessian, computed once per group (a group's layers read one input)."""
    by_group = input_hessians(model, [g.layers[0] for g in groups], windows, batch_size=batch_size)
    of_layer = {name: by_group[g.layers[0]] for g in groups for name in g.layers}
    return of_layer.__getitem__


Table = dict[str, dict[str, float]]  # {group: {format name: value}}


def _weighted_error(weight: torch.Tensor, rounded: torch.Tensor, hessian: torch.Tensor) -> float:
    """tr(ΔW H ΔWᵀ), ΔW = rounded − weight."""
    delta = rounded.float() - weight.float()
    return float(((delta @ hessian) * delta).sum())


def proxy_sensitivity(
    model: nn.Module,
    groups: Sequence[LayerGroup],
    formats: Sequence[Format],
    hessians: Callable[[str], torch.Tensor],
    rounder: Rounder = round_to_nearest,
) -> dict[str, dict[str, float]]:
    """{group: {format name: Σ over its layers of tr(ΔW H ΔWᵀ)}}, ΔW the rounding error and
    `hessians(layer)` its input Hessian, for the formats that fit every layer of the group."""
    table: dict[str, dict[str, float]] = {}
    for group in groups:
        table[group.name] = {}
        for fmt in group_formats(model, group, formats):
            total = 0.0
            if fmt.bits != 16:
                for name in group.layers:
                    weight = model.get_submodule(name).weight.detach()
                    total += _weighted_error(weight, rounder(name, weight, fmt), hessians(name))
            table[group.name][fmt.name] = total
    return table


def rank_correlation(measured: Table, proxy: Table) -> float:
    """Spearman's ρ between the two tables over every (group, format) both hold, 16-bit
    formats aside (0 in both by construction)."""
    keys = [
        (g, f)
        for g, row in measured.items()
        for f, value in row.items()
        if f in proxy.get(g, {}) and not (value == 0.0 and proxy[g][f] == 0.0)
    ]
    if len(keys) < 3:
        raise ValueError(f"rank correlation needs at least 3 pairs, got {len(keys)}")
    a = _ranks(np.array([measured[g][f] for g, f in keys]))
    b = _ranks(np.array([proxy[g][f] for g, f in keys]))
    return float(np.corrcoef(a, b)[0, 1])


def _ranks(values: np.ndarray) -> np.ndarray:
    """Ranks with ties averaged."""
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values))
    ranks[order] = np.arange(len(values), dtype=float)
    for value in np.unique(values):
        tied = values == value
        ranks[tied] = ranks[tied].mean()
    return ranks


def anchored_sensitivity(
    model: nn.Module,
    groups: Sequence[LayerGroup],
    formats: Sequence[Format],
    windows: torch.Tensor,
    hessians: Callable[[str], torch.Tensor],
    *,
    batch_size: int = 1,
    rounder: Rounder = round_to_nearest,
) -> tuple[Table, Table, dict[str, str]]:
    """(KL table, proxy table, {group: the format measured}): per group, every integer format
    rounded once (its proxy error); the coarsest (largest error) measured with those same
    rounded weights, the others that error's share of its KL (module docstring)."""
    baseline = baseline_logprobs(model, windows, batch_size=batch_size)
    table: Table = {}
    proxy: Table = {}
    anchors: dict[str, str] = {}
    for group in tqdm(groups, desc="sensitivity", unit="group", disable=None):
        fitting = group_formats(model, group, formats)
        table[group.name] = {f.name: 0.0 for f in fitting if f.bits == 16}
        proxy[group.name] = dict(table[group.name])
        anchor: tuple[Format, dict[str, torch.Tensor]] | None = None
        for fmt in (f for f in fitting if f.bits != 16):
            rounded = {}
            for name in group.layers:
                weight = model.get_submodule(name).weight.detach()
                rounded[name] = rounder(name, weight, fmt)
            proxy[group.name][fmt.name] = sum(
                _weighted_error(model.get_submodule(n).weight.detach(), w, hessians(n))
                for n, w in rounded.items()
            )
            if anchor is None or proxy[group.name][fmt.name] > proxy[group.name][anchor[0].name]:
                anchor = (fmt, rounded)  # only the coarsest so far is kept
        if anchor is None:
            continue
        fmt, rounded = anchor
        anchors[group.name] = fmt.name
        with fake_quantized(model, group.layers, fmt, lambda n, _w, _f, r=rounded: r[n]):
            measured = measure_quality(model, windows, baseline).kl_divergence
        errors = proxy[group.name]
        for name in errors:
            share = errors[name] / errors[fmt.name] if errors[fmt.name] > 0 else 0.0
            table[group.name][name] = measured * share
    return table, proxy, anchors


def float32_copy(model: nn.Module) -> nn.Module:
    """A float32 copy of `model` (module docstring: why). `nn.Module.to` itself, because
    transformers refuses `.float()` on models it loaded from packed (GGUF) weights."""
    return nn.Module.to(deepcopy(model), torch.float32)
