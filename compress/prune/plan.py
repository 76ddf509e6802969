"""What a pruning stage will do to a model's shape, decided before any weight is scored.

`model_shape` reads the decoder layers through one small table of module names and checks
every layer against the config. Two layouts of each block are known: split projections
(Llama, Mistral, Qwen2/3, Gemma 2/3, OLMo2, SmolLM3, Granite: `q_proj`/`k_proj`/`v_proj`,
`gate_proj`/`up_proj`) and fused ones (Phi-3, Phi-4-mini: `qkv_proj` with rows
[q heads | k heads | v heads], `gate_up_proj` with rows [gate | up]); an MLP of routed experts
(Qwen2-MoE, Mixtral) is recognised so that heads and layers can still be pruned.
`resolve_targets` turns the recipe's `keep`/`ratio` targets into exact counts, and
`check_planned_config` hands the pruned config to the model's own transformers config class,
which is what `save_pretrained` and a stock load will do later. All raise `PreflightError`
naming the field, layer or module at fault, so bad input fails before any calibration pass.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, replace
from typing import Literal

import torch
from huggingface_hub.errors import StrictDataclassError
from torch import nn

from compress.errors import PreflightError
from compress.models import decoder_layers_prefix
from compress.prune.config import FFNTarget, HeadTarget, PruneConfig
from compress.quant.linear import QuantLinear

# Submodule names inside one decoder layer. One table, not one class per architecture. The
# split names double as the logical names of the projections: a fused weight is read and
# scored through views of its rows under these names (`logical_weight`).
ATTENTION = "self_attn"
MLP = "mlp"
QUERY, KEY, VALUE, OUTPUT = "q_proj", "k_proj", "v_proj", "o_proj"
GATE, UP, DOWN = "gate_proj", "up_proj", "down_proj"
QKV, GATE_UP = "qkv_proj", "gate_up_proj"  # fused (Phi-3)
EXPERTS = "experts"  # routed experts (transformers 5 fused 3-D expert parameters)
SPLIT_ATTENTION = tuple(f"{ATTENTION}.{n}" for n in (QUERY, KEY, VALUE, OUTPUT))
FUSED_ATTENTION = (f"{ATTENTION}.{QKV}", f"{ATTENTION}.{OUTPUT}")
SPLIT_MLP = tuple(f"{MLP}.{n}" for n in (GATE, UP, DOWN))
FUSED_MLP = (f"{MLP}.{GATE_UP}", f"{MLP}.{DOWN}")
EXPECTED_LINEARS = SPLIT_ATTENTION + SPLIT_MLP
# Per-head norms some architectures apply to q/k (Qwen3, OLMo2): sliced with their heads when
# they span all heads, left alone when they are shared across heads (one head_dim vector).
HEAD_NORMS = {"q_norm": QUERY, "k_norm": KEY}
# Config fields with one entry per decoder layer: they follow the kept layers.
PER_LAYER_FIELDS = ("layer_types", "no_rope_layers")

AttentionLayout = Literal["split", "fused"]
MLPLayout = Literal["split", "fused", "experts"]


@dataclass(frozen=True)
class Layout:
    """How one decoder layer stores its projections (None: not a layout pruning knows)."""

    attention: AttentionLayout | None
    mlp: MLPLayout | None


@dataclass(frozen=True)
class ModelShape:
    num_layers: int
    hidden_size: int
    num_heads: int  # query heads per layer
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    attention: AttentionLayout = "split"
    # The MLP layout of every layer, or "mixed" where they differ (Qwen2-MoE `mlp_only_layers`).
    mlp: MLPLayout | Literal["mixed"] | None = "split"
    architecture: str = ""  # the model class, for messages

    @property
    def heads_per_group(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def row_splits(self) -> dict[str, tuple[tuple[str, int], ...]]:
        """Fused module → its logical parts and their row counts, in row order."""
        q_rows, kv_rows = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        return {
            f"{ATTENTION}.{QKV}": (
                (f"{ATTENTION}.{QUERY}", q_rows),
                (f"{ATTENTION}.{KEY}", kv_rows),
                (f"{ATTENTION}.{VALUE}", kv_rows),
            ),
            f"{MLP}.{GATE_UP}": (
                (f"{MLP}.{GATE}", self.intermediate_size),
                (f"{MLP}.{UP}", self.intermediate_size),
            ),
        }


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


def _is_linear(modules: dict[str, nn.Module], names: tuple[str, ...]) -> bool:
    return all(isinstance(modules.get(n), nn.Linear) for n in names)


def layer_layout(layer: nn.Module) -> Layout:
    """Which known layout one decoder layer's projections follow."""
    modules = dict(layer.named_modules())
    attention: AttentionLayout | None = None
    if _is_linear(modules, SPLIT_ATTENTION):
        attention = "split"
    elif _is_linear(modules, FUSED_ATTENTION):
        attention = "fused"
    mlp: MLPLayout | None = None
    if _is_linear(modules, SPLIT_MLP):
        mlp = "split"
    elif _is_linear(modules, FUSED_MLP):
        mlp = "fused"
    elif f"{MLP}.{EXPERTS}" in modules:
        mlp = "experts"
    return Layout(attention, mlp)


def pruned_linears(shape: ModelShape) -> tuple[str, ...]:
    """The Linear modules of a layer that head and FFN pruning score and slice."""
    attention = SPLIT_ATTENTION if shape.attention == "split" else FUSED_ATTENTION
    mlp = {"split": SPLIT_MLP, "fused": FUSED_MLP}.get(shape.mlp, ())
    return attention + mlp


def logical_weight(layer: nn.Module, name: str, shape: ModelShape) -> torch.Tensor:
    """A projection weight pruning scores, by its split name (`self_attn.q_proj`, …): a fused
    weight's part is a view of its rows, so scoring needs no layout of its own."""
    modules = dict(layer.named_modules())
    if name in modules:
        return modules[name].weight.detach()
    for fused, parts in shape.row_splits.items():
        names = [part for part, _ in parts]
        if name in names and fused in modules:
            rows = modules[fused].weight.detach().split([n for _, n in parts])
            return rows[names.index(name)]
    raise KeyError(f"no projection {name} in this layer")


def _unknown_architecture(name: str, layer: nn.Module) -> PreflightError:
    found = sorted(n for n, m in layer.named_modules() if isinstance(m, nn.Linear))
    return PreflightError(
        f"{name}: unknown architecture for pruning: expected nn.Linear submodules "
        f"{list(EXPECTED_LINEARS)}, or the fused {list(FUSED_ATTENTION + FUSED_MLP)} "
        f"(Phi-3); this layer has {found}"
    )


def _check_not_quantized(name: str, layer: nn.Module) -> None:
    quantized = [n for n, m in layer.named_modules() if isinstance(m, QuantLinear)]
    if quantized:
        raise PreflightError(
            f"{name}: {quantized} are already quantized; prune the dense model first, then "
            "quantize (pruning slices dense weights)"
        )


def model_shape(model: nn.Module) -> ModelShape:
    """The decoder's shape and layout from its config, checked against every layer."""
    prefix = decoder_layers_prefix(model)
    layers = model.get_submodule(prefix)
    layouts = []
    for index, layer in enumerate(layers):
        _check_not_quantized(f"{prefix}.{index}", layer)
        layout = layer_layout(layer)
        if layout.attention is None:
            raise _unknown_architecture(f"{prefix}.{index}", layer)
        layouts.append(layout)
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
    if num_heads % num_kv_heads:
        raise PreflightError(
            f"config: num_attention_heads {num_heads} is not a multiple of "
            f"num_key_value_heads {num_kv_heads}"
        )
    attention = {layout.attention for layout in layouts}
    mlp = {layout.mlp for layout in layouts}
    if len(attention) > 1:
        raise PreflightError(
            f"{prefix}: layers mix attention layouts {sorted(attention)}; uniform pruning "
            "cannot describe them"
        )
    shape = ModelShape(
        num_layers=len(layers),
        hidden_size=config.hidden_size,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        intermediate_size=config.intermediate_size,
        attention=attention.pop(),
        mlp=mlp.pop() if len(mlp) == 1 else "mixed",
        architecture=type(model).__name__,
    )
    for index, (layer, layout) in enumerate(zip(layers, layouts, strict=True)):
        _check_shapes(f"{prefix}.{index}", layer, shape, layout)
    return shape


def _expected_shapes(shape: ModelShape, layout: Layout) -> dict[str, tuple[int, int]]:
    hidden, inter = shape.hidden_size, shape.intermediate_size
    q_rows = shape.num_heads * shape.head_dim
    kv_rows = shape.num_kv_heads * shape.head_dim
    expected = {f"{ATTENTION}.{OUTPUT}": (hidden, q_rows)}
    if layout.attention == "split":
        expected |= {
            f"{ATTENTION}.{QUERY}": (q_rows, hidden),
            f"{ATTENTION}.{KEY}": (kv_rows, hidden),
            f"{ATTENTION}.{VALUE}": (kv_rows, hidden),
        }
    else:
        expected[f"{ATTENTION}.{QKV}"] = (q_rows + 2 * kv_rows, hidden)
    if layout.mlp == "split":
        expected |= {f"{MLP}.{GATE}": (inter, hidden), f"{MLP}.{UP}": (inter, hidden)}
    elif layout.mlp == "fused":
        expected[f"{MLP}.{GATE_UP}"] = (2 * inter, hidden)
    if layout.mlp in ("split", "fused"):
        expected[f"{MLP}.{DOWN}"] = (hidden, inter)
    return expected


def _check_shapes(name: str, layer: nn.Module, shape: ModelShape, layout: Layout) -> None:
    for sub, (rows, cols) in _expected_shapes(shape, layout).items():
        weight = layer.get_submodule(sub).weight
        if tuple(weight.shape) != (rows, cols):
            raise PreflightError(
                f"{name}.{sub}: weight is {tuple(weight.shape)}, the config says "
                f"({rows}, {cols}); per-layer sizes differ from the config, which uniform "
                "pruning cannot describe"
            )


def check_supported(shape: ModelShape, config: PruneConfig) -> None:
    """Refuse a target this model's layout cannot take, naming the layout and why."""
    if config.ffn is None or shape.mlp in ("split", "fused"):
        return
    found = {
        "experts": "routed experts (mlp.experts: 3-D expert weights behind a router)",
        "mixed": "routed experts in some layers and a dense MLP in others",
        None: f"not one pruning knows (expected {list(SPLIT_MLP)} or {list(FUSED_MLP)})",
    }[shape.mlp]
    raise PreflightError(
        f"{shape.architecture}: FFN channel pruning needs a dense MLP; this model's MLP is "
        f"{found}. Pruning expert channels is not supported (each expert and any shared "
        "expert would need its own target); prune heads or layers, or leave ffn out",
        field="ffn",
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


def planned_kept_layers(shape: ModelShape, targets: Targets) -> list[int]:
    """Kept layer indices as far as preflight knows them: which layers a score removes is only
    known after scoring, but the shapes and per-layer config fields do not depend on it
    beyond the layer types, so the last ones stand in."""
    if targets.layer_indices is not None:
        return [i for i in range(shape.num_layers) if i not in targets.layer_indices]
    return list(range(shape.num_layers - targets.remove_layers))


def _follow_kept_layers(config: object, num_layers: int, kept_layers: list[int]) -> None:
    """Per-layer config fields describe the kept layers only, in their new order."""
    if kept_layers == list(range(num_layers)):
        return
    for field in PER_LAYER_FIELDS:
        values = getattr(config, field, None)
        if isinstance(values, list | tuple):
            setattr(config, field, [values[i] for i in kept_layers])
    # Qwen2-MoE and kin pick dense layers by index (`mlp_only_layers`) and by a step that
    # counts from layer 0; after renumbering only an explicit list says which stay dense.
    only, step = (
        getattr(config, "mlp_only_layers", None),
        getattr(config, "decoder_sparse_step", None),
    )
    if only is not None and step is not None:
        config.mlp_only_layers = [
            new for new, old in enumerate(kept_layers) if old in only or (old + 1) % step
        ]
        config.decoder_sparse_step = 1


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
    _follow_kept_layers(config, shape.num_layers, kept_layers)


def planned_config(config: object, shape: ModelShape, targets: Targets) -> object:
    """A copy of the model's HF config describing the pruned model."""
    planned = copy.deepcopy(config)
    apply_targets_to_config(planned, shape, targets, planned_kept_layers(shape, targets))
    return planned


def config_rejection(config: object) -> str | None:
    """Why the config's own transformers class refuses it, or None: the checks `save_pretrained`
    runs (`validate`, the strict dataclass validators) and those a stock load runs (rebuilding
    the class from the saved dict)."""
    try:
        validate = getattr(config, "validate", None)
        if validate is not None:
            validate()
        type(config).from_dict(config.to_dict())
    except (ValueError, TypeError, KeyError, StrictDataclassError) as exc:
        # Strict-dataclass errors wrap the validator's "ValueError: …" as their last line.
        reason = str(exc).strip().splitlines()[-1].strip()
        return re.sub(r"^\w+(Error|Exception): ", "", reason).rstrip(".")
    return None


def _unchanged(shape: ModelShape) -> Targets:
    return Targets(shape.heads_per_group, shape.num_kv_heads, shape.intermediate_size, 0, None)


def _accepted_heads(config: object, shape: ModelShape, heads: HeadTarget) -> list[int]:
    """The head counts per layer (query heads, or KV groups for unit kv_group) that `config`'s
    class accepts, everything else unchanged."""
    base = _unchanged(shape)
    if heads.unit == "query":
        options = {
            k * shape.num_kv_heads: replace(base, heads_per_group=k)
            for k in range(1, shape.heads_per_group + 1)
        }
    else:
        options = {g: replace(base, num_kv_heads=g) for g in range(1, shape.num_kv_heads + 1)}
    return [
        n for n, t in options.items() if config_rejection(planned_config(config, shape, t)) is None
    ]


def check_planned_config(
    config: object, shape: ModelShape, prune: PruneConfig, targets: Targets
) -> None:
    """Refuse targets whose pruned config the model's own config class rejects (it would raise
    only when the artifact is saved, after all the work), naming the target at fault and, for
    heads, the counts the class accepts."""
    if config_rejection(config) is not None:
        return  # the source's own config fails these checks: not a pruning problem
    reason = config_rejection(planned_config(config, shape, targets))
    if reason is None:
        return
    name = type(config).__name__
    base = _unchanged(shape)
    heads_only = replace(
        base, heads_per_group=targets.heads_per_group, num_kv_heads=targets.num_kv_heads
    )
    if prune.heads is not None and config_rejection(planned_config(config, shape, heads_only)):
        field = "heads.keep" if prune.heads.keep is not None else "heads.ratio"
        accepted = ", ".join(map(str, _accepted_heads(config, shape, prune.heads)))
        unit = "query heads" if prune.heads.unit == "query" else "KV groups"
        now = targets.num_heads if prune.heads.unit == "query" else targets.num_kv_heads
        raise PreflightError(
            f"{name} rejects the pruned config ({now} {unit} per layer): {reason}; {unit} "
            f"per layer that {name} accepts: {accepted}",
            field=field,
        )
    if prune.ffn is not None and config_rejection(
        planned_config(config, shape, replace(base, intermediate_size=targets.intermediate_size))
    ):
        field = "ffn.keep" if prune.ffn.keep is not None else "ffn.ratio"
        raise PreflightError(
            f"{name} rejects the pruned config ({targets.intermediate_size} FFN channels per "
            f"layer): {reason}",
            field=field,
        )
    field = None
    if prune.layers is not None:
        field = "layers.indices" if prune.layers.indices is not None else "layers.remove"
    raise PreflightError(f"{name} rejects the pruned config: {reason}", field=field)


def plan_targets(model: nn.Module, config: PruneConfig) -> tuple[ModelShape, Targets]:
    """Shape, layout support, exact targets and the pruned config's validity: everything a
    prune stage checks before any weight is scored."""
    shape = model_shape(model)
    check_supported(shape, config)
    targets = resolve_targets(shape, config)
    check_planned_config(model.config, shape, config, targets)
    return shape, targets


def planned_model(model: nn.Module, config: PruneConfig) -> nn.Module:
    """A weightless (meta) model with the shapes the stage will produce, for later stages'
    preflight (prune → quantize checks group sizes against the pruned shapes)."""
    shape, targets = plan_targets(model, config)
    new_config = planned_config(model.config, shape, targets)
    with torch.device("meta"):
        return type(model)(new_config)
