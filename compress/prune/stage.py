"""The `prune` stage: score heads / KV groups / FFN channels / layers, slice, fix the config.

Scores are taken once, on the model as it enters the stage, for every target; then layers are
removed and the kept layers are sliced to the uniform targets, so the result is a standard HF
model whose `config.json` describes it and which stock transformers loads.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from compress.models import count_params, decoder_layers_prefix
from compress.prune.config import PruneConfig
from compress.prune.plan import (
    ATTENTION,
    DOWN,
    GATE,
    KEY,
    MLP,
    OUTPUT,
    QUERY,
    UP,
    VALUE,
    ModelShape,
    Targets,
    apply_targets_to_config,
    logical_weight,
    plan_targets,
    planned_model,
)
from compress.prune.scores import (
    Projections,
    UnitStats,
    element_scores,
    expand_units,
    head_output_energy,
    keep_top,
    keep_top_per_group,
    layers_to_remove,
    unit_scores,
)
from compress.prune.slicing import prune_attention, prune_mlp, remove_layers
from compress.prune.statistics import CalibrationStatistics, LayerStatistics, collect_statistics
from compress.registry import StageContext, StageResult, register_stage

log = logging.getLogger(__name__)


def preflight(model: nn.Module, config: PruneConfig) -> None:
    """Module names, layouts, shapes, every target and the pruned config as the model's own
    config class sees it, checked before any scoring."""
    plan_targets(model, config)


def _weight(layer: nn.Module, name: str, shape: ModelShape) -> torch.Tensor:
    """A projection's weight by its split name; a view of the rows of a fused one."""
    return logical_weight(layer, name, shape)


def _taylor(stats: LayerStatistics, *names: str) -> tuple[torch.Tensor, ...] | None:
    return tuple(stats.taylor[n] for n in names) if stats.taylor else None


def _head_energy(layer: nn.Module, shape: ModelShape, stats: LayerStatistics) -> torch.Tensor:
    """Each query head's contribution to the residual stream, Σ‖W_h a_h‖², (H,)."""
    if stats.attention_gram is None:
        raise ValueError("activation scores need attention statistics (a calibration pass)")
    output = _weight(layer, f"{ATTENTION}.{OUTPUT}", shape)
    return head_output_energy(output, stats.attention_gram)


def _query_elements(
    layer: nn.Module, shape: ModelShape, config: PruneConfig, stats: LayerStatistics
) -> torch.Tensor:
    """Per-element partial scores of the q rows and o columns, (H·D,)."""
    q, o = f"{ATTENTION}.{QUERY}", f"{ATTENTION}.{OUTPUT}"
    return element_scores(
        Projections(rows=(_weight(layer, q, shape),), columns=(_weight(layer, o, shape),)),
        config.criterion,
        UnitStats(None, _taylor(stats, q), _taylor(stats, o)),
        config.norm,
    )


def query_head_scores(
    layer: nn.Module, shape: ModelShape, config: PruneConfig, stats: LayerStatistics
) -> torch.Tensor:
    """(H,) importance of each query head."""
    if config.criterion == "activation":
        return _head_energy(layer, shape, stats).sqrt()
    return unit_scores(
        _query_elements(layer, shape, config, stats), shape.head_dim, config.criterion, config.norm
    )


def kv_group_scores(
    layer: nn.Module, shape: ModelShape, config: PruneConfig, stats: LayerStatistics
) -> torch.Tensor:
    """(KV,) importance of each KV group: its K and V heads with all their query heads."""
    groups = shape.num_kv_heads
    if config.criterion == "activation":
        # k/v feed attention, not the residual stream: a KV group's contribution is that of
        # its query heads (their sum, cross-head terms left out).
        return _head_energy(layer, shape, stats).reshape(groups, -1).sum(1).sqrt()
    k, v = f"{ATTENTION}.{KEY}", f"{ATTENTION}.{VALUE}"
    kv_elements = element_scores(  # (KV·D,): k and v rows of each KV head summed
        Projections(rows=(_weight(layer, k, shape), _weight(layer, v, shape)), columns=()),
        config.criterion,
        UnitStats(None, _taylor(stats, k, v), ()),
        config.norm,
    )
    owned = torch.cat(  # (KV, G·D + D): everything one KV group owns
        [
            _query_elements(layer, shape, config, stats).reshape(groups, -1),
            kv_elements.reshape(groups, -1),
        ],
        dim=1,
    )
    return unit_scores(owned.reshape(-1), owned.shape[1], config.criterion, config.norm)


def choose_heads(
    layer: nn.Module,
    shape: ModelShape,
    targets: Targets,
    config: PruneConfig,
    stats: LayerStatistics,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(kept query heads, kept KV heads) of one layer, ascending."""
    assert config.heads is not None
    groups = shape.num_kv_heads
    if config.heads.unit == "query":
        scores = query_head_scores(layer, shape, config, stats)
        return keep_top_per_group(scores, groups, targets.heads_per_group), torch.arange(groups)
    kept_groups = keep_top(kv_group_scores(layer, shape, config, stats), targets.num_kv_heads)
    return expand_units(kept_groups, shape.heads_per_group), kept_groups


def choose_channels(
    layer: nn.Module,
    shape: ModelShape,
    targets: Targets,
    config: PruneConfig,
    stats: LayerStatistics,
) -> torch.Tensor:
    """Kept FFN channels of one layer, ascending."""
    gate, up, down = (f"{MLP}.{n}" for n in (GATE, UP, DOWN))
    elements = element_scores(  # (I,)
        Projections(
            rows=(_weight(layer, gate, shape), _weight(layer, up, shape)),
            columns=(_weight(layer, down, shape),),
        ),
        config.criterion,
        UnitStats(stats.ffn_input_sq, _taylor(stats, gate, up), _taylor(stats, down)),
        config.norm,
    )
    return keep_top(
        unit_scores(elements, 1, config.criterion, config.norm), targets.intermediate_size
    )


def statistics_for(
    model: nn.Module, config: PruneConfig, context: StageContext
) -> CalibrationStatistics | None:
    """The calibration pass the config's scores need (None when weights alone decide)."""
    if not config.needs_calibration:
        return None
    if context.calibration_windows is None:
        raise RuntimeError("the prune stage needs calibration windows (recipe `calibration`)")
    width = config.heads is not None or config.ffn is not None
    return collect_statistics(
        model,
        context.calibration_windows(),
        context.calibration_batch_size,
        activations=width and config.criterion == "activation",
        gradients=width and config.criterion == "taylor",
        layer_distances=config.layers is not None and config.layers.remove is not None,
    )


@register_stage(PruneConfig, preflight=preflight, plan=planned_model)
def prune_model(model: nn.Module, config: PruneConfig, context: StageContext) -> StageResult:
    return prune_with_statistics(model, config, statistics_for(model, config, context))


def prune_with_statistics(
    model: nn.Module, config: PruneConfig, stats: CalibrationStatistics | None
) -> StageResult:
    """Score with `stats` (from `statistics_for`, or any pass that gathered at least as much),
    slice the model in place, and report."""
    shape, targets = plan_targets(model, config)
    parameters_before = count_params(model)
    layer_stats = stats.layers if stats else [LayerStatistics() for _ in range(shape.num_layers)]

    layer_scores = None
    if targets.layer_indices is not None:
        removed = list(targets.layer_indices)
    elif targets.remove_layers:
        assert stats is not None
        layer_scores = stats.layer_scores()
        removed = layers_to_remove(layer_scores, targets.remove_layers)
    else:
        removed = []

    prefix = decoder_layers_prefix(model)
    layers = model.get_submodule(prefix)
    heads_change = (targets.heads_per_group, targets.num_kv_heads) != (
        shape.heads_per_group,
        shape.num_kv_heads,
    )
    kept_heads: dict[int, list[int]] = {}
    spanning_norms: set[str] = set()
    for index, layer in enumerate(layers):
        if index in removed:
            continue
        if heads_change:
            query_heads, kv_heads = choose_heads(layer, shape, targets, config, layer_stats[index])
            attention = layer.get_submodule(ATTENTION)
            spanning_norms.update(prune_attention(attention, query_heads, kv_heads, shape.head_dim))
            kept_heads[index] = query_heads.tolist()
        if targets.intermediate_size != shape.intermediate_size:
            prune_mlp(
                layer.get_submodule(MLP),
                choose_channels(layer, shape, targets, config, layer_stats[index]),
            )
    kept_layers = remove_layers(model, prefix, removed)
    apply_targets_to_config(model.config, shape, targets, kept_layers)

    if spanning_norms:
        log.warning(
            "%s normalize over all heads together; after pruning they normalize over the kept "
            "heads only, which changes the kept heads' outputs too (recovery training helps)",
            sorted(spanning_norms),
        )
    parameters_after = count_params(model)
    log.info(
        "pruned %s → %s parameters (%.3f×)",
        f"{parameters_before:,}",
        f"{parameters_after:,}",
        parameters_after / parameters_before,
    )
    per_layer = {
        "query_heads": targets.num_heads,
        "kv_heads": targets.num_kv_heads,
        "head_dim": shape.head_dim,
        "ffn_channels": targets.intermediate_size,
    }
    return StageResult(
        summary=_summary(shape, targets, removed, config, parameters_before, parameters_after),
        details={
            "criterion": config.criterion,
            "norm": config.norm,
            "layer_criterion": None if layer_scores is None else config.layers.criterion,
            "parameters_before": parameters_before,
            "parameters_after": parameters_after,
            "parameter_ratio": parameters_after / parameters_before,
            "layers_before": shape.num_layers,
            "layers_removed": removed,
            "layer_scores": None
            if layer_scores is None
            else [round(float(s), 6) for s in layer_scores],
            "per_layer_before": {
                "query_heads": shape.num_heads,
                "kv_heads": shape.num_kv_heads,
                "head_dim": shape.head_dim,
                "ffn_channels": shape.intermediate_size,
            },
            "per_layer_after": per_layer,
            "layers": [{"source_layer": i, **per_layer} for i in kept_layers],
            "kept_query_heads": kept_heads,
            "norms_spanning_heads": sorted(spanning_norms),
            "calibration_tokens": stats.tokens if stats else 0,
            "uniform": True,  # every layer has the same sizes: config.json describes the model
        },
    )


def _summary(
    shape: ModelShape,
    targets: Targets,
    removed: list[int],
    config: PruneConfig,
    before: int,
    after: int,
) -> str:
    parts = []
    if (targets.num_heads, targets.num_kv_heads) != (shape.num_heads, shape.num_kv_heads):
        parts.append(
            f"heads {shape.num_heads}/{shape.num_kv_heads} → "
            f"{targets.num_heads}/{targets.num_kv_heads} (query/KV)"
        )
    if targets.intermediate_size != shape.intermediate_size:
        parts.append(f"FFN {shape.intermediate_size} → {targets.intermediate_size}")
    if removed:
        parts.append(f"layers {removed} removed")
    what = ", ".join(parts) or "nothing pruned"
    ratio = after / before
    return f"{what}; {config.criterion} scores; {before:,} → {after:,} parameters ({ratio:.3f}×)"
