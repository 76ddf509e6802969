"""Importance scores for heads, KV groups, FFN channels and layers: pure functions on tensors.

A unit (an FFN channel, a query head, a KV group) owns rows of the projections that write it
(q/k/v, gate/up) and columns of the projection that reads it (o, down). Every criterion is
computed from per-row and per-column partial sums, so the three share one shape of code:

- magnitude:  (Σ |w|^p over the unit's weights)^(1/p)
- activation: the size of the unit's contribution to the residual stream over the
  calibration tokens, ‖W_u X_u‖_F, where W_u are the output-projection columns the unit
  feeds and X_u its activations (in the spirit of Wanda's |W|·‖X‖, but exact for the unit).
  For an FFN channel j this is ‖x_j‖₂ · ‖W[:, j]‖₂; for a head (head_dim columns whose
  activations correlate) it is sqrt(tr(W_h C_h W_hᵀ)) with C_h the head's activation Gram
  matrix (`head_output_energy`), which beats the sum of per-column products on real models
- taylor:     |Σ over the unit's weights of g·w|, with g the gradient of the calibration loss
  summed over batches: the first-order estimate of how much the loss changes when the unit's
  weights are set to zero (LLM-Pruner's vector-wise score)

Higher is more important; `keep_top*` keep the highest and return indices in their original
order (so kept heads stay grouped by KV head and channels keep their positions).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

Criterion = Literal["magnitude", "activation", "taylor"]


@dataclass(frozen=True)
class Projections:
    """One unit family's weights: `rows` are written by the unit (one row per unit element),
    `columns` read it (one column per unit element). Shapes (out, in)."""

    rows: tuple[torch.Tensor, ...]
    columns: tuple[torch.Tensor, ...]


@dataclass(frozen=True)
class UnitStats:
    """Calibration statistics for one unit family in one layer (either may be None)."""

    input_sq: torch.Tensor | None = None  # (n,) Σ x² of the reading projection's inputs
    # Signed Σ g·w per row of each `rows` tensor and per column of each `columns` tensor,
    # in the same order as Projections: ((n,), ...), ((n,), ...).
    taylor_rows: tuple[torch.Tensor, ...] | None = None
    taylor_columns: tuple[torch.Tensor, ...] | None = None


def element_scores(
    weights: Projections, criterion: Criterion, stats: UnitStats, norm: int = 2
) -> torch.Tensor:
    """A per-element (row of `rows` / column of `columns`) partial score, (n,), float32.

    Magnitude returns Σ|w|^p (summed into units, then rooted, by `unit_scores`); activation
    returns ‖x_j‖₂·‖W[:, j]‖₂ (one column per unit: FFN channels); taylor returns the signed
    Σ g·w (summed into units, then |·|).
    """
    if criterion == "magnitude":
        parts = [w.float().abs().pow(norm).sum(1) for w in weights.rows]
        parts += [w.float().abs().pow(norm).sum(0) for w in weights.columns]
        return torch.stack(parts).sum(0)
    if criterion == "activation":
        if stats.input_sq is None:
            raise ValueError("activation scores need input statistics (a calibration pass)")
        column_norms = torch.stack(
            [torch.linalg.vector_norm(w.float(), dim=0) for w in weights.columns]
        ).sum(0)
        return stats.input_sq.float().sqrt() * column_norms
    if stats.taylor_rows is None or stats.taylor_columns is None:
        raise ValueError("taylor scores need gradient statistics (a calibration pass)")
    return torch.stack([*stats.taylor_rows, *stats.taylor_columns]).float().sum(0)


def head_output_energy(output_weight: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """Σ over calibration tokens of ‖W_h a_h‖² per head: tr(W_h C_h W_hᵀ).

    output_weight: o_proj weight (hidden, H·D); gram: Σ a_h a_hᵀ of o_proj's input per head,
    (H, D, D). Returns (H,), float32; the square root is the head's activation score.
    """
    heads, head_dim, _ = gram.shape
    w = output_weight.float().reshape(-1, heads, head_dim)  # (hidden, H, D)
    return torch.einsum("ohd,hde,ohe->h", w, gram.float(), w).clamp_min(0)


def unit_scores(
    elements: torch.Tensor, unit_size: int, criterion: Criterion, norm: int = 2
) -> torch.Tensor:
    """Sum consecutive `unit_size` elements into units, (n,) → (n // unit_size,)."""
    summed = elements.reshape(-1, unit_size).sum(1)
    if criterion == "magnitude":
        return summed.pow(1.0 / norm)
    if criterion == "taylor":
        return summed.abs()
    return summed


def keep_top(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices of the `keep` highest scores, ascending (ties: the lower index is kept)."""
    if not 0 < keep <= scores.numel():
        raise ValueError(f"keep {keep} of {scores.numel()}")
    # A stable sort on the negated scores ranks equal scores by index.
    order = torch.sort(-scores.float(), stable=True).indices[:keep]
    return order.sort().values


def keep_top_per_group(scores: torch.Tensor, groups: int, keep_per_group: int) -> torch.Tensor:
    """Keep the same number of units in each of `groups` consecutive groups (GQA query heads
    per KV head); indices ascending, so the kept units stay grouped."""
    per_group = scores.numel() // groups
    kept = [
        keep_top(group_scores, keep_per_group) + g * per_group
        for g, group_scores in enumerate(scores.reshape(groups, per_group))
    ]
    return torch.cat(kept)


def expand_units(units: torch.Tensor, unit_size: int) -> torch.Tensor:
    """Unit indices → element indices: heads → their head_dim rows. (k,) → (k · unit_size,)."""
    offsets = torch.arange(unit_size, device=units.device)
    return (units[:, None] * unit_size + offsets).reshape(-1)


def cosine_distance_sum(inputs: torch.Tensor, outputs: torch.Tensor) -> torch.Tensor:
    """Σ over tokens of 1 − cos(input, output) of a layer's hidden states (B, T, H) → scalar.

    A layer whose output points where its input did (mostly the residual passing through)
    changes little; ShortGPT's block influence."""
    cos = torch.nn.functional.cosine_similarity(inputs.float(), outputs.float(), dim=-1)
    return (1 - cos).sum()


def layers_to_remove(layer_scores: torch.Tensor, count: int) -> list[int]:
    """The `count` lowest-scoring layers, ascending (ties: the later layer goes first)."""
    # Ties go to the later layer, which depth-pruning studies find the most redundant.
    ranked = sorted(range(layer_scores.numel()), key=lambda i: (float(layer_scores[i]), -i))
    return sorted(ranked[:count])
