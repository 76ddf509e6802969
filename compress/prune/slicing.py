"""Slicing a decoder in place: the kept rows and columns of each projection, whole layers.

Direct slicing, by the module-name table in `compress.prune.plan`, rather than a traced
dependency graph: for the HF decoder layout the coupled tensors of a head, a KV group or an
FFN channel are known exactly (and tested against a masked forward pass), and the config
fields that must change with them (`num_key_value_heads`, `head_dim`, `layer_types`, each
attention's `layer_idx`) are not part of any graph. A fused projection (Phi-3 `qkv_proj`,
`gate_up_proj`) is sliced as its parts would be: the kept rows of each part, offset by the
rows of the parts before it, so the parts stay in order and the model's own split of the
fused output still finds them.
"""

from __future__ import annotations

import torch
from torch import nn

from compress.models import replace_module
from compress.prune.plan import (
    DOWN,
    GATE,
    GATE_UP,
    HEAD_NORMS,
    KEY,
    OUTPUT,
    QKV,
    QUERY,
    UP,
    VALUE,
)
from compress.prune.scores import expand_units


def _replace_parameter(module: nn.Module, name: str, value: torch.Tensor) -> None:
    old = getattr(module, name)
    setattr(module, name, nn.Parameter(value.contiguous(), requires_grad=old.requires_grad))


def keep_rows(linear: nn.Linear, rows: torch.Tensor) -> None:
    """Keep output features `rows` (and their bias entries)."""
    _replace_parameter(linear, "weight", linear.weight.detach()[rows])
    if linear.bias is not None:
        _replace_parameter(linear, "bias", linear.bias.detach()[rows])
    linear.out_features = rows.numel()


def keep_columns(linear: nn.Linear, columns: torch.Tensor) -> None:
    """Keep input features `columns`; the bias belongs to the outputs and stays whole."""
    _replace_parameter(linear, "weight", linear.weight.detach()[:, columns])
    linear.in_features = columns.numel()


def prune_attention(
    attention: nn.Module, query_heads: torch.Tensor, kv_heads: torch.Tensor, head_dim: int
) -> list[str]:
    """Keep `query_heads` and `kv_heads` (ascending indices); q/k/v rows, o columns, biases and
    any per-head q/k norms are sliced together. Returns the names of the norms that span all
    heads (OLMo2's q_norm/k_norm): sliced, they normalize over the kept heads only, so unlike
    everything else here they change what the kept heads compute.

    Query heads must stay grouped by KV head with the same count per group, which
    `keep_top_per_group` (unit query) and whole-group selection (unit kv_group) guarantee; then
    repeat_kv maps kept query head h to kept KV head h // (heads per group), as before.
    """
    query_rows = expand_units(query_heads, head_dim)
    kv_rows = expand_units(kv_heads, head_dim)
    output = attention.get_submodule(OUTPUT)
    # Rows of all query heads and of all KV heads, before slicing (the norms' full widths).
    norm_sizes = {QUERY: output.in_features}
    if hasattr(attention, QKV):  # fused rows [q heads | k heads | v heads]
        fused = attention.get_submodule(QKV)
        norm_sizes[KEY] = (fused.out_features - output.in_features) // 2
        q_size, kv_size = norm_sizes[QUERY], norm_sizes[KEY]
        keep_rows(fused, torch.cat([query_rows, q_size + kv_rows, q_size + kv_size + kv_rows]))
    else:
        norm_sizes[KEY] = attention.get_submodule(KEY).out_features
        keep_rows(attention.get_submodule(QUERY), query_rows)
        keep_rows(attention.get_submodule(KEY), kv_rows)
        keep_rows(attention.get_submodule(VALUE), kv_rows)
    keep_columns(output, query_rows)
    spanning = []
    for norm_name, projection in HEAD_NORMS.items():
        norm = getattr(attention, norm_name, None)
        weight = getattr(norm, "weight", None)
        # A norm over every head's features is sliced; one shared by all heads (a head_dim
        # vector, as in Qwen3) is left alone.
        if weight is not None and weight.numel() == norm_sizes[projection]:
            rows = query_rows if projection == QUERY else kv_rows
            if rows.numel() != weight.numel():
                spanning.append(norm_name)
            _replace_parameter(norm, "weight", weight.detach()[rows])
    attention.num_key_value_groups = query_heads.numel() // kv_heads.numel()
    for attribute, value in (("num_heads", query_heads), ("num_key_value_heads", kv_heads)):
        if hasattr(attention, attribute):
            setattr(attention, attribute, value.numel())
    return spanning


def prune_mlp(mlp: nn.Module, channels: torch.Tensor) -> None:
    """Keep FFN `channels`: gate/up rows (both halves of a fused gate_up_proj, at the same
    channel indices) and down columns."""
    down = mlp.get_submodule(DOWN)
    if hasattr(mlp, GATE_UP):  # fused rows [gate | up]
        size = down.in_features
        keep_rows(mlp.get_submodule(GATE_UP), torch.cat([channels, size + channels]))
    else:
        keep_rows(mlp.get_submodule(GATE), channels)
        keep_rows(mlp.get_submodule(UP), channels)
    keep_columns(down, channels)
    if hasattr(mlp, "intermediate_size"):
        mlp.intermediate_size = channels.numel()


def remove_layers(model: nn.Module, prefix: str, remove: list[int]) -> list[int]:
    """Drop decoder layers `remove` and renumber the rest (`layer_idx` indexes the KV cache);
    returns the original indices of the kept layers."""
    layers = model.get_submodule(prefix)
    kept = [i for i in range(len(layers)) if i not in set(remove)]
    replace_module(model, prefix, nn.ModuleList([layers[i] for i in kept]))
    for new_index, layer in enumerate(model.get_submodule(prefix)):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_index
    return kept
