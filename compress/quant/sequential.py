"""Sequential, layer-by-layer calibration: the lifecycle glue around a pure algorithm.

The calibration windows run through the model once, up to the first decoder layer, and the
inputs of that layer are kept. Then, for each decoder layer in turn:

1. its selected Linear layers are split into *steps* by data flow: layers that read the very
   same input tensor form one step (q/k/v; gate/up), found by running the layer once with
   hooks, so no per-architecture table is needed;
2. step by step, the layer runs on the kept inputs, only as far as the step, with hooks that
   accumulate the step's input Hessian (once, shared by the step's Linears), and the step's
   Linears are quantized (so o_proj is calibrated on what the already-quantized q/k/v
   produce: "true sequential");
3. the quantized layer runs once more, and its outputs become the next layer's inputs.

Within a decoder layer a quantized Linear is stood in for by a dense Linear holding its
dequantized weight (bitwise the same outputs, without dequantizing on every call); the
packed QuantLinear takes its place when the layer is done.

A fused MoE experts module (compress/quant/experts.py) is a step of its own: the layer runs
on the kept inputs as far as the experts call, whose arguments (the hidden states and the
router's `top_k_index`, i.e. the model's own routing) are kept, and the caller quantizes each
expert on the tokens routed to it. The quantized experts module computes the rest of the
layer's calibration directly.

Peak memory is one decoder layer's activations plus the kept hidden states (samples × seq_len ×
hidden in the model dtype, inputs and outputs of the current layer), not the model twice. With
a calibration device, each layer is moved there for its turn and back afterwards, so a GPU needs
room for one layer and the activations, not for the model.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from compress.models import decoder_layers_prefix, replace_module
from compress.quant.experts import RoutedBatch
from compress.quant.linear import QuantLinear

log = logging.getLogger(__name__)

# (layer name, Linear, its input Hessian, number of rows it was built from) → replacement.
QuantizeFn = Callable[[str, nn.Linear, torch.Tensor, int], nn.Module]
HessianFn = Callable[[torch.Tensor | None, torch.Tensor, int], tuple[torch.Tensor, int]]
# (experts module name, the module, what each calibration batch called it with) → replacement.
QuantizeExpertsFn = Callable[[str, nn.Module, list[RoutedBatch]], nn.Module]


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


def _first_input(args: tuple, kwargs: dict[str, Any]) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def data_flow_steps(
    layer: nn.Module, names: dict[str, nn.Module], inputs: LayerInputs
) -> list[list[str]]:
    """Group Linear layers that read the same input tensor, in the order they run; any other
    module (an experts module) is a step of its own."""
    first_seen: dict[str, int] = {}
    # The input tensors themselves are kept (not just their addresses) so that no freed
    # tensor's memory can be reused by a later input and make two different inputs look equal.
    inputs_seen: dict[str, Any] = {}
    handles = []
    for name, module in names.items():

        def hook(m: nn.Module, args: tuple, kwargs: dict[str, Any], name: str = name) -> None:
            first_seen.setdefault(name, len(first_seen))
            # A module that is no Linear gets a key of its own: it is never grouped.
            own = _first_input(args, kwargs) if isinstance(m, nn.Linear) else object()
            inputs_seen.setdefault(name, own)

        handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        single = LayerInputs(hidden=inputs.hidden[:1], kwargs=inputs.kwargs[:1])
        _run_layer(layer, single)
    finally:
        for handle in handles:
            handle.remove()
    never_called = sorted(set(names) - set(first_seen))
    if never_called:
        raise RuntimeError(f"modules never called in their decoder layer: {never_called}")
    steps: list[list[str]] = []
    step_of_input: dict[int, list[str]] = {}
    for name in sorted(first_seen, key=first_seen.__getitem__):
        key = id(inputs_seen[name])
        if key not in step_of_input:
            step_of_input[key] = []
            steps.append(step_of_input[key])
        step_of_input[key].append(name)
    return steps


def _step_hessians(
    layer: nn.Module, modules: dict[str, nn.Linear], inputs: LayerInputs, accumulate: HessianFn
) -> tuple[torch.Tensor, int]:
    """The input Hessian shared by one step's Linears (they read the very same tensor).

    Each batch runs the layer only as far as the step: the forward stops once every Linear of
    the step has been called, so calibrating q/k/v costs a norm, not a whole layer.
    """
    state: list[Any] = [None, 0]  # running Hessian, rows folded in
    called: set[str] = set()
    handles = []
    for name, module in modules.items():

        def hook(_m: nn.Module, args: tuple, name: str = name) -> None:
            if not called:  # the first Linear of the step to run: its input is the step's
                state[0], state[1] = accumulate(state[0], args[0].detach().float(), state[1])
            called.add(name)
            if len(called) == len(modules):
                raise _StopForward

        handles.append(module.register_forward_pre_hook(hook))
    try:
        for hidden, kwargs in zip(inputs.hidden, inputs.kwargs, strict=True):
            called.clear()
            with contextlib.suppress(_StopForward):
                layer(hidden, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    if state[0] is None:
        raise RuntimeError(f"Linear layers never called in their decoder layer: {sorted(modules)}")
    return state[0], state[1]


def routed_inputs(layer: nn.Module, module: nn.Module, inputs: LayerInputs) -> list[RoutedBatch]:
    """What `module` (an experts module) is called with on every batch: the hidden states
    (T, H) and the router's top_k_index (T, k). Each batch runs the layer up to that call."""
    routed: list[RoutedBatch] = []

    def hook(_m: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        index = args[1] if len(args) > 1 else kwargs["top_k_index"]
        routed.append(RoutedBatch(_first_input(args, kwargs).detach(), index.detach()))
        raise _StopForward

    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for hidden, kwargs in zip(inputs.hidden, inputs.kwargs, strict=True):
            with contextlib.suppress(_StopForward):
                layer(hidden, **kwargs)
    finally:
        handle.remove()
    if len(routed) != len(inputs.hidden):
        raise RuntimeError(
            f"experts module called on {len(routed)} of {len(inputs.hidden)} calibration batches"
        )
    return routed


class _DequantizedLinear(nn.Module):
    """Stand-in for a quantized layer during the rest of its decoder layer's calibration.

    A QuantLinear dequantizes its whole weight on every call, and calibration calls it once per
    batch per remaining step; this holds the dequantized weight once. It computes exactly what
    the QuantLinear op does (F.linear on the dequantized weight, then the bias), so the outputs
    are bitwise equal.
    """

    def __init__(self, quantized: QuantLinear) -> None:
        super().__init__()
        self.weight = quantized.dequantized_weight()
        self.bias = quantized.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = nn.functional.linear(x, self.weight.to(x.dtype))
        return y if self.bias is None else y + self.bias


def _calibration_stand_in(module: nn.Module) -> nn.Module:
    return _DequantizedLinear(module) if isinstance(module, QuantLinear) else module


@torch.no_grad()
def quantize_sequentially(
    model: nn.Module,
    selected: dict[str, nn.Linear],
    windows: torch.Tensor,
    *,
    batch_size: int,
    accumulate: HessianFn,
    quantize: QuantizeFn,
    device: torch.device | None = None,
    experts: dict[str, nn.Module] | None = None,
    quantize_experts: QuantizeExpertsFn | None = None,
) -> int:
    """Quantize every selected Linear (and experts module) in the decoder layers, layer by layer.

    With `device`, the kept activations live there and each decoder layer is moved there for
    its calibration and back where it was afterwards: a model held in CPU memory is calibrated
    on a GPU holding one layer at a time. Returns how many layers were replaced. Selected
    Linears outside the decoder layers (e.g. an explicitly included lm_head) must be handled
    by the caller. `experts` (by name) are replaced by what `quantize_experts` makes of them.
    """
    experts = experts or {}
    if experts and quantize_experts is None:
        raise ValueError("experts modules selected without a quantize_experts function")
    prefix = decoder_layers_prefix(model)
    layers = model.get_submodule(prefix)
    inputs = capture_first_layer_inputs(model, windows, batch_size)
    if device is not None:
        inputs = LayerInputs(hidden=_to(inputs.hidden, device), kwargs=_to(inputs.kwargs, device))
    replaced = 0
    for index, layer in enumerate(tqdm(layers, desc="calibrate layers", unit="layer")):
        home = _device_of(layer)
        if device is not None:
            layer.to(device)
        layer_prefix = f"{prefix}.{index}."
        in_layer = {
            n.removeprefix(layer_prefix): m
            for n, m in {**selected, **experts}.items()
            if n.startswith(layer_prefix)
        }
        quantized: dict[str, nn.Module] = {}
        if in_layer:
            for step in data_flow_steps(layer, in_layer, inputs):
                modules = {name: layer.get_submodule(name) for name in step}
                if step[0] in experts_names(experts, layer_prefix):
                    (name,) = step
                    routed = routed_inputs(layer, modules[name], inputs)
                    quantized[name] = quantize_experts(layer_prefix + name, modules[name], routed)
                    replace_module(layer, name, quantized[name])
                    continue
                hessian, rows = _step_hessians(layer, modules, inputs, accumulate)
                for name, module in modules.items():
                    quantized[name] = quantize(layer_prefix + name, module, hessian, rows)
                    replace_module(layer, name, _calibration_stand_in(quantized[name]))
        inputs = LayerInputs(hidden=_run_layer(layer, inputs), kwargs=inputs.kwargs)
        for name, module in quantized.items():
            replace_module(layer, name, module)
        layer.to(home)
        replaced += len(quantized)
    return replaced


def experts_names(experts: dict[str, nn.Module], layer_prefix: str) -> set[str]:
    return {n.removeprefix(layer_prefix) for n in experts if n.startswith(layer_prefix)}


def _device_of(module: nn.Module) -> torch.device:
    tensor = next(itertools.chain(module.parameters(), module.buffers()), None)
    return torch.device("cpu") if tensor is None else tensor.device


def _to(value: Any, device: torch.device) -> Any:
    """Tensors inside lists, tuples and dicts (the layer's kwargs) moved to `device`."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (list, tuple)):
        return type(value)(_to(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    return value
