"""One calibration pass that gathers what the data-driven scores need, in bounded memory.

Everything is accumulated per batch into small float32 vectors (one value per input feature,
per weight row or per weight column), so memory does not grow with the number of batches:

- activation: per head, the Gram matrix Σ a aᵀ (head_dim × head_dim) of o_proj's input, and
  per FFN channel Σ x² of down_proj's input, via forward pre-hooks;
- taylor: the signed Σ g·w per row of q/k/v/gate/up and per column of o/down, where g is the
  gradient of the causal-LM loss on the batch; the gradient is reduced and dropped after each
  batch, so only one batch's gradients exist at a time. A fused projection's rows are reduced
  once and stored under its parts' split names (`qkv_proj` → `q_proj`, `k_proj`, `v_proj`), so
  scoring reads one vocabulary whatever the layout;
- layer distances: Σ over tokens of 1 − cos(layer input, layer output), via forward hooks.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from compress.models import decoder_layers_prefix
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
    model_shape,
    pruned_linears,
)
from compress.prune.scores import cosine_distance_sum

log = logging.getLogger(__name__)

# Logical (split-layout) names of the projections whose rows / columns a unit owns.
ROW_OWNED = (
    f"{ATTENTION}.{QUERY}",
    f"{ATTENTION}.{KEY}",
    f"{ATTENTION}.{VALUE}",
    f"{MLP}.{GATE}",
    f"{MLP}.{UP}",
)
COLUMN_OWNED = (f"{ATTENTION}.{OUTPUT}", f"{MLP}.{DOWN}")


@dataclass
class LayerStatistics:
    attention_gram: torch.Tensor | None = None  # (H, D, D) Σ a aᵀ per head into o_proj
    ffn_input_sq: torch.Tensor | None = None  # (I,) Σ x² into down_proj
    taylor: dict[str, torch.Tensor] = field(default_factory=dict)  # module → (rows,) / (cols,)
    cosine_distance_sum: float = 0.0


@dataclass
class CalibrationStatistics:
    layers: list[LayerStatistics]
    tokens: int

    def layer_scores(self) -> torch.Tensor:
        """Mean 1 − cos(input, output) per layer, (L,)."""
        return torch.tensor([s.cosine_distance_sum for s in self.layers]) / max(self.tokens, 1)


def _accumulate(current: torch.Tensor | None, update: torch.Tensor) -> torch.Tensor:
    return update if current is None else current + update


@contextlib.contextmanager
def _hooks(handles: list[torch.utils.hooks.RemovableHandle]) -> Iterator[None]:
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _register_activation_hooks(
    layers: nn.ModuleList, stats: list[LayerStatistics], shape: ModelShape
) -> list[torch.utils.hooks.RemovableHandle]:
    handles = []
    for layer, layer_stats in zip(layers, stats, strict=True):

        def attention_hook(_m: nn.Module, args: tuple, s: LayerStatistics = layer_stats) -> None:
            x = args[0].detach().float().reshape(-1, shape.num_heads, shape.head_dim)  # (N, H, D)
            gram = torch.einsum("nhd,nhe->hde", x, x)
            s.attention_gram = _accumulate(s.attention_gram, gram)

        def ffn_hook(_m: nn.Module, args: tuple, s: LayerStatistics = layer_stats) -> None:
            x = args[0].detach().float()  # (B, T, I)
            s.ffn_input_sq = _accumulate(s.ffn_input_sq, x.pow(2).sum((0, 1)))

        handles.append(
            layer.get_submodule(f"{ATTENTION}.{OUTPUT}").register_forward_pre_hook(attention_hook)
        )
        if shape.mlp in ("split", "fused"):  # routed experts have no channel to score
            down = layer.get_submodule(f"{MLP}.{DOWN}")
            handles.append(down.register_forward_pre_hook(ffn_hook))
    return handles


def _register_distance_hooks(
    layers: nn.ModuleList, stats: list[LayerStatistics]
) -> list[torch.utils.hooks.RemovableHandle]:
    handles = []
    for layer, layer_stats in zip(layers, stats, strict=True):

        def hook(
            _m: nn.Module,
            args: tuple,
            kwargs: dict,
            output: object,
            s: LayerStatistics = layer_stats,
        ) -> None:
            hidden_in = args[0] if args else kwargs["hidden_states"]  # (B, T, H)
            hidden_out = output[0] if isinstance(output, tuple) else output
            s.cosine_distance_sum += float(
                cosine_distance_sum(hidden_in.detach(), hidden_out.detach())
            )

        handles.append(layer.register_forward_hook(hook, with_kwargs=True))
    return handles


def _accumulate_taylor(
    layers: nn.ModuleList, stats: list[LayerStatistics], shape: ModelShape
) -> None:
    """Reduce this batch's weight gradients to Σ g·w per row / column, then drop them."""
    for layer, layer_stats in zip(layers, stats, strict=True):
        for name in pruned_linears(shape):
            weight = layer.get_submodule(name).weight
            if weight.grad is None:
                raise RuntimeError(f"no gradient reached {name}; is the module used?")
            product = weight.grad.float() * weight.detach().float()  # (out, in)
            weight.grad = None
            if name in COLUMN_OWNED:
                reduced = {name: product.sum(0)}
            else:
                parts = shape.row_splits.get(name, ((name, product.shape[0]),))
                rows = product.sum(1).split([n for _, n in parts])
                reduced = {part: r for (part, _), r in zip(parts, rows, strict=True)}
            for part, value in reduced.items():
                layer_stats.taylor[part] = _accumulate(layer_stats.taylor.get(part), value)


def collect_statistics(
    model: nn.Module,
    windows: torch.Tensor,
    batch_size: int,
    *,
    activations: bool,
    gradients: bool,
    layer_distances: bool,
) -> CalibrationStatistics:
    """Run the calibration windows (N, T) through the model once, gathering what is asked."""
    layers = model.get_submodule(decoder_layers_prefix(model))
    shape = model_shape(model)
    stats = [LayerStatistics() for _ in layers]
    handles = []
    if activations:
        handles += _register_activation_hooks(layers, stats, shape)
    if layer_distances:
        handles += _register_distance_hooks(layers, stats)
    scored = {id(layer.get_submodule(n).weight) for layer in layers for n in pruned_linears(shape)}
    flags = {p: p.requires_grad for p in model.parameters()}
    tokens = 0
    try:
        with _hooks(handles):
            for p in model.parameters():
                # Gradients only for the weights being scored: nothing else is kept.
                p.requires_grad_(gradients and id(p) in scored)
            for batch in tqdm(windows.split(batch_size), desc="prune: scoring", unit="batch"):
                tokens += batch.numel()
                if gradients:
                    loss = model(input_ids=batch, labels=batch, use_cache=False).loss
                    loss.backward()
                    _accumulate_taylor(layers, stats, shape)
                else:
                    with torch.no_grad():
                        model(input_ids=batch, use_cache=False)
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
            p.grad = None
    log.info("pruning statistics over %d calibration tokens", tokens)
    return CalibrationStatistics(layers=stats, tokens=tokens)
