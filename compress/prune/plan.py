"""What a pruning stage will do to a model's shape, decided before any weight is scored.

`model_shape` reads the decoder layers through one small table of module names (the layout
Llama, Mistral, Qwen2/3 and their kin share) and checks every layer against the config;
`resolve_targets` turns the recipe's `keep`/`ratio` targets into exact counts. Both raise
`PreflightError` naming the field, layer or module at fault, so bad input fails before any
calibration pass.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from compress.errors import PreflightError
from compress.models import decoder_layers_prefix
from compress.prune.config import FFNTarget, HeadTarget, PruneConfig
from compress.quant.linear import QuantLinear

# Submodule names inside one decoder layer. One table, not one class per architecture: models
# with fused projections (Phi-3 `qkv_proj`, `gate_up_proj`) do not match and are refused.
ATTENTION = "self_attn"
MLP = "mlp"
QUERY, KEY, VALUE, OUTPUT = "q_proj", "k_proj", "v_proj", "o_proj"
GATE, UP, DOWN = "gate_proj", "up_proj", "down_proj"
EXPECTED_LINEARS = tuple(f"{ATTENTION}.{n}" for n in (QUERY, KEY, VALUE, OUTPUT)) + tuple(
    f"{MLP}.{n}" for n in (GATE, UP, DOWN)
)
# Per-head norms some architectures apply to q/k (Qwen3, OLMo2): sliced with their heads when
# they span all heads, left alone when they are shared across heads (one head_dim vector).
HEAD_NORMS = {"q_norm": QUERY, "k_norm": KEY}


@dataclass(frozen=True)
class ModelShape:
    num_layers: int
    hidden_size: int
    num_heads: int  # query heads per layer
    num_kv_heads: int
    head_dim: int
    intermediate_size: int

    @property
    def heads_per_group(self) -> int:
        return self.num_heads // self.num_kv_heads


@dataclass(frozen=True)
class Targets:
    """Exact per-layer sizes after pruning, plus which layers go (None = chosen by score)."""

    heads_per_group: int
    num_kv_heads: int
    intermediate_size: int
    remove_layers: int
    layer_indices: tuple[int, ...] | None  # explicit `layers.indices`

    @property
    def num_heads(self) -> int:
        return self.heads_per_group * self.num_kv_heads


def model_shape(model: nn.Module) -> ModelShape:
    """The decoder's shape from its config, checked against every layer's modules."""
    prefix = decoder_layers_prefix(model)
    layers = model.get_submodule(prefix)
    for index, layer in enumerate(layers):
        _check_names(f"{prefix}.{index}", layer)
    config = model.config
    missing = [
        f
        for f in ("hidden_size", "num_attention_heads", "intermediate_size")
        if not hasattr(config, f)
    ]
    if missing:
        raise PreflightError(f"config: no {missing}; pruning reads them to size heads and channels")
    num_heads = config.num_attention_heads
    num_kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
    shape = ModelShape(
        num_layers=len(layers),
        hidden_size=config.hidden_size,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        intermediate_size=config.intermediate_size,
    )
    if num_heads % num_kv_heads:
        raise PreflightError(
            f"config: num_attention_heads {num_heads} is not a multiple of "
            f"num_key_value_heads {num_kv_heads}"
        )
    for index, layer in enumerate(layers):
        _check_shapes(f"{prefix}.{index}", layer, shape)
    return shape


def _check_names(name: str, layer: nn.Module) -> None:
    modules = dict(layer.named_modules())
    quantized = [n for n in EXPECTED_LINEARS if isinstance(modules.get(n), QuantLinear)]
    if quantized:
        raise PreflightError(
            f"{name}: {quantized} are already quantized; prune the dense model first, then "
            "quantize (pruning slices dense weights)"
        )
    missing = [n for n in EXPECTED_LINEARS if not isinstance(modules.get(n), nn.Linear)]
    if missing:
        found = sorted(n for n, m in modules.items() if isinstance(m, nn.Linear))
        raise PreflightError(
            f"{name}: unknown architecture for pruning: expected nn.Linear submodules "
            f"{list(EXPECTED_LINEARS)}; missing {missing}; this layer has {found}"
        )


def _check_shapes(name: str, layer: nn.Module, shape: ModelShape) -> None:
    modules = dict(layer.named_modules())
    q_rows = shape.num_heads * shape.head_dim
    kv_rows = shape.num_kv_heads * shape.head_dim
    expected = {
        f"{ATTENTION}.{QUERY}": (q_rows, shape.hidden_size),
        f"{ATTENTION}.{KEY}": (kv_rows, shape.hidden_size),
        f"{ATTENTION}.{VALUE}": (kv_rows, shape.hidden_size),
        f"{ATTENTION}.{OUTPUT}": (shape.hidden_size, q_rows),
        f"{MLP}.{GATE}": (shape.intermediate_size, shape.hidden_size),
        f"{MLP}.{UP}": (shape.intermediate_size, shape.hidden_size),
        f"{MLP}.{DOWN}": (shape.hidden_size, shape.intermediate_size),
    }
    for sub, (rows, cols) in expected.items():
        weight = modules[sub].weight
        if tuple(weight.shape) != (rows, cols):
            raise PreflightError(
                f"{name}.{sub}: weight is {tuple(weight.shape)}, the config says "
                f"({rows}, {cols}); per-layer sizes differ from the config, which uniform "
                "pruning cannot describe"
            )


def _round_share(count: int, ratio: float) -> int:
    """How many of `count` units a `ratio` removes: the nearest whole number."""
    return round(count * ratio)


def _head_targets(shape: ModelShape, heads: HeadTarget | None) -> tuple[int, int]:
    """(query heads per KV group, KV heads) after pruning."""
    per_group, groups = shape.heads_per_group, shape.num_kv_heads
    if heads is None:
        return per_group, groups
    if heads.unit == "query":
        if per_group == 1:
            raise PreflightError(
                f"heads.unit query: every KV group has one query head ({shape.num_heads} query, "
                f"{groups} KV heads), so none can be removed and the grouping kept; use "
                "heads.unit kv_group, which prunes a head's q, k, v and o together"
            )
        if heads.keep is not None:
            if heads.keep % groups or heads.keep > shape.num_heads:
                raise PreflightError(
                    f"heads.keep {heads.keep} breaks the GQA grouping: it must be a multiple of "
                    f"num_key_value_heads {groups} and at most {shape.num_heads}, so every KV "
                    f"group keeps the same number of query heads (e.g. "
                    f"{[groups * k for k in range(1, per_group + 1)]})"
                )
            return heads.keep // groups, groups
        kept = per_group - _round_share(per_group, heads.ratio or 0.0)
        if kept < 1:
            raise PreflightError(
                f"heads.ratio {heads.ratio} removes every query head of each KV group "
                f"({per_group} per group)"
            )
        return kept, groups
    if heads.keep is not None:
        if heads.keep > groups:
            raise PreflightError(
                f"heads.keep {heads.keep}: the model has {groups} KV groups per layer"
            )
        return per_group, heads.keep
    kept = groups - _round_share(groups, heads.ratio or 0.0)
    if kept < 1:
        raise PreflightError(f"heads.ratio {heads.ratio} removes every KV group ({groups})")
    return per_group, kept


def _ffn_target(shape: ModelShape, ffn: FFNTarget | None) -> int:
    size = shape.intermediate_size
    if ffn is None:
        return size
    if ffn.keep is not None:
        if ffn.keep > size:
            raise PreflightError(f"ffn.keep {ffn.keep}: the model has {size} FFN channels")
        return ffn.keep
    if not ffn.ratio:
        return size
    step = ffn.multiple_of
    kept = min(round(size * (1 - ffn.ratio) / step) * step, size // step * step)
    if kept < 1:
        raise PreflightError(
            f"ffn.ratio {ffn.ratio} with multiple_of {step} leaves no channel of {size}"
        )
    return kept


def resolve_targets(shape: ModelShape, config: PruneConfig) -> Targets:
    heads_per_group, kv_heads = _head_targets(shape, config.heads)
    intermediate = _ffn_target(shape, config.ffn)
    remove, indices = 0, None
    if config.layers is not None:
        if config.layers.indices is not None:
            out_of_range = [i for i in config.layers.indices if i >= shape.num_layers]
            if out_of_range:
                raise PreflightError(
                    f"layers.indices {out_of_range}: the model has {shape.num_layers} layers "
                    f"(0..{shape.num_layers - 1})"
                )
            indices = tuple(sorted(config.layers.indices))
            remove = len(indices)
        else:
            remove = config.layers.remove or 0
        if remove >= shape.num_layers:
            raise PreflightError(
                f"layers: removing {remove} of {shape.num_layers} decoder layers leaves none"
            )
    return Targets(heads_per_group, kv_heads, intermediate, remove, indices)


def apply_targets_to_config(
    config: object, shape: ModelShape, targets: Targets, kept_layers: list[int]
) -> None:
    """Describe the pruned model in its HF config, in place. head_dim is written explicitly:
    the default hidden_size // num_attention_heads would change with the head count."""
    config.head_dim = shape.head_dim
    config.num_attention_heads = targets.num_heads
    config.num_key_value_heads = targets.num_kv_heads
    config.intermediate_size = targets.intermediate_size
    config.num_hidden_layers = len(kept_layers)
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        config.layer_types = [layer_types[i] for i in kept_layers]


def planned_model(model: nn.Module, config: PruneConfig) -> nn.Module:
    """A weightless (meta) model with the shapes the stage will produce, for later stages'
    preflight (prune → quantize checks group sizes against the pruned shapes)."""
    shape = model_shape(model)
    targets = resolve_targets(shape, config)
    # Which layers go is only known after scoring; the shapes do not depend on it.
    kept = list(range(shape.num_layers - targets.remove_layers))
    if targets.layer_indices is not None:
        kept = [i for i in range(shape.num_layers) if i not in targets.layer_indices]
    new_config = copy.deepcopy(model.config)
    apply_targets_to_config(new_config, shape, targets, kept)
    with torch.device("meta"):
        return type(model)(new_config)
