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
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from compress.evaluate.quality import baseline_logprobs, measure_quality
from compress.quant.config import QuantizeConfig
from compress.quant.plan import select_targets
from compress.quant.primitives import QuantSpec, fake_quantize
from compress.search.candidates import Format, fits

log = logging.getLogger(__name__)

# Sibling projections that read one input and are grouped (fused in the ONNX export, too).
COUPLED = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


@dataclass(frozen=True)
class LayerGroup:
    name: str
    layers: tuple[str, ...]


def layer_groups(model: nn.Module) -> list[LayerGroup]:
    """The decoder's Linear layers in groups (module docstring), in model order."""
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
    return groups


def group_formats(model: nn.Module, group: LayerGroup, formats: Sequence[Format]) -> list[Format]:
    """The formats every layer of the group can take, in the given order."""
    widths = {model.get_submodule(name).in_features for name in group.layers}
    return [fmt for fmt in formats if all(fits(fmt, k) for k in widths)]


def _spec(fmt: Format) -> QuantSpec:
    return QuantSpec(bits=fmt.bits, group_size=fmt.group_size, symmetric=fmt.symmetric)


@contextlib.contextmanager
def fake_quantized(model: nn.Module, layers: Sequence[str], fmt: Format) -> Iterator[None]:
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
                rounded = fake_quantize(weight.detach(), _spec(fmt), weight.dtype)
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
        with fake_quantized(model, group.layers, fmt):
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


def proxy_sensitivity(
    model: nn.Module,
    groups: Sequence[LayerGroup],
    formats: Sequence[Format],
    hessians: dict[str, torch.Tensor],
) -> dict[str, dict[str, float]]:
    """{group: {format name: Σ over its layers of tr(ΔW H ΔWᵀ)}}, ΔW the rounding error, for
    the formats that fit every layer of the group."""
    table: dict[str, dict[str, float]] = {}
    for group in groups:
        table[group.name] = {}
        for fmt in group_formats(model, group, formats):
            total = 0.0
            if fmt.bits != 16:
                for name in group.layers:
                    weight = model.get_submodule(name).weight.detach()
                    delta = fake_quantize(weight, _spec(fmt), weight.dtype) - weight.float()
                    total += float(((delta @ hessians[name]) * delta).sum())
            table[group.name][fmt.name] = total
    return table


Table = dict[str, dict[str, float]]  # {group: {format name: value}}


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
