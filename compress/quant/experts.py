"""Mixture-of-experts weights: finding them, quantizing them per expert, computing with them.

transformers 5 stores a MoE layer's experts as one module (`Qwen2MoeExperts`,
`MixtralExperts`, ...) holding two 3-D parameters,

    gate_up_proj  (E, 2·I, H)   rows [0, I) are expert e's gate_proj, rows [I, 2I) its up_proj
    down_proj     (E, H, I)

called as `experts(hidden (T, H), top_k_index (T, k), top_k_weights (T, k))` after the
router (`gate`) picked each token's experts. Every expert is an ordinary gated MLP: its
matrices are quantized like Linear weights, `(N, K)` with groups along the input dimension K.

`QuantExperts` takes the module's place. It holds one `QuantExpert` per expert, whose gate,
up and down projections are QuantLinear layers, so the state dict reads

    <experts>.<e>.gate_proj.weight_packed / weight_scale / weight_zero_point / weight_shape

which is the per-expert checkpoint layout compressed-tensors and llm-compressor write for MoE
models. The projections take the names the family's own per-expert checkpoints use (Mixtral:
`w1`, `w3`, `w2`), read from transformers' conversion mapping for the model type, so that
stock transformers' loader, which merges `experts.*.<gate>.weight` and `experts.*.<up>.weight`
into `gate_up_proj` (dequantizing compressed-tensors' packed tensors first), reads them back;
a model type without such a mapping gets `gate_proj` / `up_proj` / `down_proj` and is
readable by our loader only (`stock_loadable`). Splitting
`gate_up_proj` into its gate and up rows changes nothing in the codes: quantization, GPTQ
included, treats every output row on its own given the input Hessian, which gate and up share.
Each projection runs through the same `compress::dequant_matmul` op as any QuantLinear, so
the CPU and CUDA kernels apply per expert.

Only the layout transformers' `@use_experts_implementation` calls standard is taken:
concatenated [gate; up] rows, not transposed, no biases, a gate, no post-expert norm and the
default `act_fn(gate) * up`. Anything else is refused by name in preflight (`layout_problem`).

GPTQ calibrates each expert on the tokens the model routed to it: the hidden states the
experts module is called with, restricted to the rows whose `top_k_index` holds the expert
(the same rows the module's own forward gathers), and `down_proj` on the intermediate
activations the already-quantized gate/up produce for those rows. A matrix whose expert saw
fewer tokens than `expert_min_tokens_per_feature × in_features` is rounded to nearest instead:
its Hessian, built from fewer rows than it has columns (or barely more), is singular or too
noisy for GPTQ's error feedback to help on tokens it has not seen.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from compress.quant.linear import QuantLinear
from compress.quant.packing import PackedWeight
from compress.quant.primitives import QuantSpec

log = logging.getLogger(__name__)

# The experts' fused parameters, and the per-expert projections they are stored as (by
# default; see `projection_names`).
FUSED_PARAMS = ("gate_up_proj", "down_proj")
PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
_PER_EXPERT_SOURCE = re.compile(r"experts\.\*\.(\w+)\.weight$")
# The layout flags transformers' `use_experts_implementation` sets, at their standard value.
_STANDARD_LAYOUT = {
    "is_transposed": False,
    "has_bias": False,
    "is_concatenated": True,
    "has_gate": True,
    "has_post_expert_norm": False,
}

# (projection name such as "3.gate_proj", weight (N, K)) → packed weight, round to nearest.
MatrixQuantizer = Callable[[str, torch.Tensor], PackedWeight]


# --------------------------------------------------------------------------- finding experts


def holds_3d_weights(module: nn.Module) -> bool:
    """A module that directly holds a 3-D floating parameter: a fused experts module."""
    return any(p.ndim == 3 and p.is_floating_point() for p in module.parameters(recurse=False))


def layout_problem(module: nn.Module) -> str | None:
    """Why `module` is not a fused experts module this file can quantize, or None."""
    params = dict(module.named_parameters(recurse=False))
    missing = [n for n in FUSED_PARAMS if n not in params or params[n].ndim != 3]
    if missing:
        return f"no 3-D {' / '.join(missing)} (holds {sorted(params)})"
    if not hasattr(module, "is_transposed") or not hasattr(module, "act_fn"):
        return "not a transformers `@use_experts_implementation` experts module"
    odd = [
        f"{k}={getattr(module, k)}"
        for k, v in _STANDARD_LAYOUT.items()
        if getattr(module, k, v) != v
    ]
    if odd:
        return f"layout {', '.join(odd)}"
    gate = getattr(type(module), "_apply_gate", None)
    if gate is not None and gate.__name__ != "_default_apply_gate":
        return f"its own gating ({type(module).__name__}._apply_gate)"
    extra = sorted(set(params) - set(FUSED_PARAMS))
    if extra:
        return f"parameters besides {FUSED_PARAMS}: {extra}"
    experts, two_i, hidden = params["gate_up_proj"].shape
    if two_i % 2 or tuple(params["down_proj"].shape) != (experts, hidden, two_i // 2):
        return (
            f"gate_up_proj {tuple(params['gate_up_proj'].shape)} and down_proj "
            f"{tuple(params['down_proj'].shape)} are not (E, 2I, H) and (E, H, I)"
        )
    return None


def matrix_shapes(module: nn.Module) -> dict[str, tuple[int, int, int]]:
    """(experts, out_features, in_features) of each fused parameter."""
    return {n: tuple(getattr(module, n).shape) for n in FUSED_PARAMS}  # type: ignore[misc]


def is_router(module: nn.Module, num_experts: int) -> bool:
    """A sibling of an experts module that scores experts (or a shared expert, one output):
    it stays in the source dtype. Routers are a tiny share of the weights and the choice of
    experts flips with small changes of their logits."""
    weight = module._parameters.get("weight")
    return weight is not None and weight.ndim == 2 and weight.shape[0] in (num_experts, 1)


@functools.cache
def _mapped_projection_names(model_type: str) -> tuple[str, str, str] | None:
    """(gate, up, down) names of the per-expert checkpoint layout transformers converts into
    the fused parameters for `model_type`, or None where it has no such conversion."""
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping

    found: dict[str, list[str]] = {}
    for transform in get_checkpoint_conversion_mapping(model_type) or []:
        targets = getattr(transform, "_original_target_patterns", None) or []
        sources = getattr(transform, "_original_source_patterns", None) or []
        names = [m.group(1) for m in map(_PER_EXPERT_SOURCE.search, sources) if m]
        for param in FUSED_PARAMS:
            if len(targets) == 1 and targets[0].endswith(f"experts.{param}"):
                found[param] = names
    gate_up, down = found.get("gate_up_proj", []), found.get("down_proj", [])
    if len(gate_up) != 2 or len(down) != 1:
        return None
    return gate_up[0], gate_up[1], down[0]


def projection_names(module: nn.Module) -> tuple[str, str, str]:
    """(gate, up, down): what a fused experts module's per-expert projections are stored as."""
    model_type = getattr(getattr(module, "config", None), "model_type", None)
    return (model_type and _mapped_projection_names(model_type)) or PROJECTIONS


def stock_loadable(module: nn.Module) -> bool:
    """Whether stock transformers maps the per-expert layout back into this module."""
    model_type = getattr(getattr(module, "config", None), "model_type", None)
    return bool(model_type) and _mapped_projection_names(model_type) is not None


# --------------------------------------------------------------------------- the module


def routed_rows(top_k_index: torch.Tensor, expert: int) -> torch.Tensor:
    """Indices of the tokens routed to `expert`: the rows the experts module gathers for it."""
    return torch.nonzero((top_k_index == expert).any(dim=-1)).flatten()


class QuantExpert(nn.Module):
    """One expert's gated MLP with quantized projections, under the names `names` (gate, up,
    down) the family's per-expert checkpoints use."""

    def __init__(
        self,
        gate_proj: QuantLinear,
        up_proj: QuantLinear,
        down_proj: QuantLinear,
        names: tuple[str, str, str] = PROJECTIONS,
    ):
        super().__init__()
        self.names = names
        for name, projection in zip(names, (gate_proj, up_proj, down_proj), strict=True):
            self.add_module(name, projection)

    def projection(self, kind: str) -> QuantLinear:
        """`kind` is one of PROJECTIONS, whatever the stored name."""
        return self._modules[self.names[PROJECTIONS.index(kind)]]  # type: ignore[return-value]

    def intermediate(self, x: torch.Tensor, act_fn: nn.Module) -> torch.Tensor:
        return act_fn(self.projection("gate_proj")(x)) * self.projection("up_proj")(x)

    def forward(self, x: torch.Tensor, act_fn: nn.Module) -> torch.Tensor:
        return self.projection("down_proj")(self.intermediate(x, act_fn))


class QuantExperts(nn.Module):
    """Stands in for a fused experts module: the same call, its experts quantized.

    The experts are submodules named "0" … "E-1" (not a ModuleList, which the decoder-layer
    search could mistake for the layer stack when E equals the layer count).
    """

    def __init__(
        self, experts: list[QuantExpert], act_fn: nn.Module, *, stock_loadable: bool
    ) -> None:
        super().__init__()
        self.num_experts = len(experts)
        for index, expert in enumerate(experts):
            self.add_module(str(index), expert)
        self.act_fn = act_fn
        # Whether stock transformers maps these per-expert tensors back into its fused module.
        self.stock_loadable = stock_loadable

    @classmethod
    def of(cls, module: nn.Module, experts: list[QuantExpert]) -> QuantExperts:
        """The QuantExperts taking `module`'s place."""
        return cls(experts, module.act_fn, stock_loadable=stock_loadable(module))

    def experts(self) -> Iterator[QuantExpert]:
        for index in range(self.num_experts):
            yield self._modules[str(index)]  # type: ignore[misc]

    def expert(self, index: int) -> QuantExpert:
        return self._modules[str(index)]  # type: ignore[return-value]

    @classmethod
    def empty_like(
        cls, module: nn.Module, spec_of: Callable[[str], QuantSpec], dtype: torch.dtype
    ) -> QuantExperts:
        """Zeroed QuantExperts of `module`'s shapes (for loading); `spec_of("<e>.<name>")`
        with the stored projection name (`projection_names`)."""
        num_experts, two_i, hidden = module.gate_up_proj.shape
        names = projection_names(module)
        sizes = ((hidden, two_i // 2), (hidden, two_i // 2), (two_i // 2, hidden))
        experts = [
            QuantExpert(
                *(
                    QuantLinear(k, n, bias=False, spec=spec_of(f"{e}.{name}"), dtype=dtype)
                    for name, (k, n) in zip(names, sizes, strict=True)
                ),
                names=names,
            )
            for e in range(num_experts)
        ]
        return cls.of(module, experts)

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        # The eager experts forward of transformers, with each expert's matmuls quantized:
        # experts in ascending order, each adding its weighted output to the tokens it got.
        final = torch.zeros_like(hidden_states)
        for index in torch.unique(top_k_index).tolist():
            if not 0 <= index < self.num_experts:  # an expert another rank holds (EP)
                continue
            token_idx, top_k_pos = torch.where(top_k_index == index)
            out = self.expert(index)(hidden_states[token_idx], self.act_fn)
            out = out * top_k_weights[token_idx, top_k_pos, None]
            final.index_add_(0, token_idx, out.to(final.dtype))
        return final

    def stored_bytes(self) -> int:
        return sum(m.stored_bytes() for m in self.modules() if isinstance(m, QuantLinear))


# --------------------------------------------------------------------------- quantizing


def expert_matrices(module: nn.Module, index: int) -> dict[str, torch.Tensor]:
    """Expert `index`'s (N, K) weights as views of the fused parameters."""
    gate_up = module.gate_up_proj[index].detach()
    half = gate_up.shape[0] // 2
    return {
        "gate_proj": gate_up[:half],
        "up_proj": gate_up[half:],
        "down_proj": module.down_proj[index].detach(),
    }


def _quant_linear(packed: PackedWeight, spec: QuantSpec, dtype: torch.dtype) -> QuantLinear:
    return QuantLinear.from_packed(packed, spec, None, dtype)


def quantize_experts_rtn(
    module: nn.Module, spec: QuantSpec, quantize: MatrixQuantizer
) -> QuantExperts:
    """Every expert's three matrices through `quantize` (round to nearest)."""
    dtype = module.gate_up_proj.dtype
    names = projection_names(module)
    experts = []
    for e in range(module.gate_up_proj.shape[0]):
        weights = expert_matrices(module, e)
        experts.append(
            QuantExpert(
                *(_quant_linear(quantize(f"{e}.{p}", w), spec, dtype) for p, w in weights.items()),
                names=names,
            )
        )
    return QuantExperts.of(module, experts)


@dataclass
class RoutedBatch:
    """What one calibration batch called the experts module with."""

    hidden: torch.Tensor  # (T, H)
    top_k_index: torch.Tensor  # (T, k)


@dataclass
class ExpertsCalibration:
    """Per expert: tokens routed to it; which matrices fell back to round to nearest."""

    tokens: list[int] = field(default_factory=list)
    rtn_fallback: list[str] = field(default_factory=list)  # "e.down_proj"


# (projection name, weight (N, K), input Hessian (K, K), rows it holds) → packed weight (GPTQ).
HessianQuantizer = Callable[[str, torch.Tensor, torch.Tensor, int], PackedWeight]
HessianAccumulator = Callable[[torch.Tensor | None, torch.Tensor, int], tuple[torch.Tensor, int]]


def _hessian(
    accumulate: HessianAccumulator, batches: list[torch.Tensor]
) -> tuple[torch.Tensor | None, int]:
    hessian, rows = None, 0
    for inputs in batches:
        if inputs.shape[0]:
            hessian, rows = accumulate(hessian, inputs.float(), rows)
    return hessian, rows


def quantize_experts_gptq(
    module: nn.Module,
    routed: list[RoutedBatch],
    spec: QuantSpec,
    *,
    accumulate: HessianAccumulator,
    gptq: HessianQuantizer,
    rtn: MatrixQuantizer,
    min_tokens_per_feature: float,
) -> tuple[QuantExperts, ExpertsCalibration]:
    """Each expert by GPTQ on the tokens routed to it (see the module docstring).

    gate_proj and up_proj share the Hessian of the expert's routed hidden states; down_proj's
    is built from what the quantized gate/up make of them, as the sequential Linear path
    calibrates down_proj after gate/up are quantized.
    """
    dtype = module.gate_up_proj.dtype
    calibration = ExpertsCalibration()

    def quantize(key: str, weight: torch.Tensor, hessian: torch.Tensor | None, rows: int):
        if hessian is None or rows < min_tokens_per_feature * weight.shape[1]:
            calibration.rtn_fallback.append(key)
            return _quant_linear(rtn(key, weight), spec, dtype)
        return _quant_linear(gptq(key, weight, hessian, rows), spec, dtype)

    experts = []
    for e in range(module.gate_up_proj.shape[0]):
        weights = expert_matrices(module, e)
        inputs = [b.hidden[routed_rows(b.top_k_index, e)] for b in routed]
        calibration.tokens.append(sum(x.shape[0] for x in inputs))
        hessian, rows = _hessian(accumulate, inputs)
        gate_proj = quantize(f"{e}.gate_proj", weights["gate_proj"], hessian, rows)
        up_proj = quantize(f"{e}.up_proj", weights["up_proj"], hessian, rows)
        intermediate = [module.act_fn(gate_proj(x)) * up_proj(x) for x in inputs]
        hessian, rows = _hessian(accumulate, intermediate)
        down_proj = quantize(f"{e}.down_proj", weights["down_proj"], hessian, rows)
        experts.append(QuantExpert(gate_proj, up_proj, down_proj, names=projection_names(module)))
    return QuantExperts.of(module, experts), calibration
