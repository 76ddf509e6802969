"""Sequential, layer-by-layer calibration: the lifecycle glue around a pure algorithm.

The calibration windows run through the model once, up to the first decoder layer, and the
inputs of that layer are kept. Then, for each decoder layer in turn:

1. its selected Linear layers are split into *steps* by data flow: layers that read the very
   same input tensor form one step (q/k/v; gate/up), found by running the layer once with
   hooks, so no per-architecture table is needed;
2. step by step, the layer runs on the kept inputs with hooks that accumulate each Linear's
   input Hessian, and the step's Linears are quantized (so o_proj is calibrated on what the
   already-quantized q/k/v produce: "true sequential");
3. the quantized layer runs once more, and its outputs become the next layer's inputs.

Peak memory is one decoder layer's activations plus the kept hidden states
(samples × seq_len × hidden, float32), not the model twice.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from compress.models import decoder_layers_prefix, replace_module

log = logging.getLogger(__name__)

# (layer name, Linear, its input Hessian, number of rows it was built from) → replacement.
QuantizeFn = Callable[[str, nn.Linear, torch.Tensor, int], nn.Module]
HessianFn = Callable[[torch.Tensor | None, torch.Tensor, int], tuple[torch.Tensor, int]]


class _StopForward(Exception):
    """Raised by the capture hook once the first decoder layer's inputs are in hand."""


@dataclass
class LayerInputs:
    """What one decoder layer is called with, per calibration batch."""

    hidden: list[torch.Tensor]  # per batch: (B, T, H)
    kwargs: list[dict[str, Any]]  # per batch: attention mask, position embeddings, ...


def capture_first_layer_inputs(
    model: nn.Module, windows: torch.Tensor, batch_size: int
) -> LayerInputs:
    """Run the model up to its first decoder layer on every batch of windows (B, T)."""
    layers = model.get_submodule(decoder_layers_prefix(model))
    captured = LayerInputs(hidden=[], kwargs=[])

    def hook(_module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.hidden.append(hidden.detach())
        captured.kwargs.append({k: v for k, v in kwargs.items() if k != "hidden_states"})
        raise _StopForward

    handle = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for batch in windows.split(batch_size):
            with contextlib.suppress(_StopForward):
                model(input_ids=batch, use_cache=False)
    finally:
        handle.remove()
    return captured


def _run_layer(layer: nn.Module, inputs: LayerInputs) -> list[torch.Tensor]:
    outputs = []
    for hidden, kwargs in zip(inputs.hidden, inputs.kwargs, strict=True):
        out = layer(hidden, **kwargs)
        outputs.append((out[0] if isinstance(out, tuple) else out).detach())
    return outputs


def data_flow_steps(
    layer: nn.Module, names: dict[str, nn.Linear], inputs: LayerInputs
) -> list[list[str]]:
    """Group Linear layers that read the same input tensor, in the order they run."""
    first_seen: dict[str, int] = {}
    # The input tensors themselves are kept (not just their addresses) so that no freed
    # tensor's memory can be reused by a later input and make two different inputs look equal.
    inputs_seen: dict[str, torch.Tensor] = {}
    handles = []
    for name, module in names.items():

        def hook(_m: nn.Module, args: tuple, name: str = name) -> None:
            first_seen.setdefault(name, len(first_seen))
            inputs_seen.setdefault(name, args[0])

        handles.append(module.register_forward_pre_hook(hook))
    try:
        single = LayerInputs(hidden=inputs.hidden[:1], kwargs=inputs.kwargs[:1])
        _run_layer(layer, single)
    finally:
        for handle in handles:
            handle.remove()
    never_called = sorted(set(names) - set(first_seen))
    if never_called:
        raise RuntimeError(f"Linear layers never called in their decoder layer: {never_called}")
    steps: list[list[str]] = []
    step_of_input: dict[int, list[str]] = {}
    for name in sorted(first_seen, key=first_seen.__getitem__):
        key = id(inputs_seen[name])
        if key not in step_of_input:
            step_of_input[key] = []
            steps.append(step_of_input[key])
        step_of_input[key].append(name)
    return steps


def _hessians(
    layer: nn.Module, modules: dict[str, nn.Linear], inputs: LayerInputs, accumulate: HessianFn
) -> dict[str, tuple[torch.Tensor, int]]:
    state: dict[str, tuple[torch.Tensor | None, int]] = {name: (None, 0) for name in modules}
    handles = []
    for name, module in modules.items():

        def hook(_m: nn.Module, args: tuple, name: str = name) -> None:
            hessian, count = state[name]
            state[name] = accumulate(hessian, args[0].detach().float(), count)

        handles.append(module.register_forward_pre_hook(hook))
    try:
        _run_layer(layer, inputs)
    finally:
        for handle in handles:
            handle.remove()
    return {name: (h, n) for name, (h, n) in state.items() if h is not None}


@torch.no_grad()
def quantize_sequentially(
    model: nn.Module,
    selected: dict[str, nn.Linear],
    windows: torch.Tensor,
    *,
    batch_size: int,
    accumulate: HessianFn,
    quantize: QuantizeFn,
) -> int:
    """Quantize every selected Linear inside the decoder layers, layer by layer.

    Returns how many layers were replaced. Selected Linears outside the decoder layers (e.g.
    an explicitly included lm_head) must be handled by the caller.
    """
    prefix = decoder_layers_prefix(model)
    layers = model.get_submodule(prefix)
    inputs = capture_first_layer_inputs(model, windows, batch_size)
    replaced = 0
    for index, layer in enumerate(tqdm(layers, desc="calibrate layers", unit="layer")):
        layer_prefix = f"{prefix}.{index}."
        in_layer = {
            n.removeprefix(layer_prefix): m
            for n, m in selected.items()
            if n.startswith(layer_prefix)
        }
        if in_layer:
            for step in data_flow_steps(layer, in_layer, inputs):
                modules = {name: layer.get_submodule(name) for name in step}
                for name, (hessian, rows) in _hessians(layer, modules, inputs, accumulate).items():
                    replacement = quantize(layer_prefix + name, modules[name], hessian, rows)
                    replace_module(layer, name, replacement)
                    replaced += 1
        inputs = LayerInputs(hidden=_run_layer(layer, inputs), kwargs=inputs.kwargs)
    return replaced
