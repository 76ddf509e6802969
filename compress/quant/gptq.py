"""GPTQ weight quantization (Frantar et al., 2022): pure functions on a weight and its Hessian.

GPTQ quantizes a Linear weight `W (N, K)` one input column at a time and, after each column,
spreads that column's rounding error over the not-yet-quantized columns so that the layer's
*output* on calibration data changes as little as possible. The objective, per output row, is

    ½ · Δ H Δᵀ   with   Δ = w - ŵ,   H = 2/n · Σ x xᵀ   (n calibration rows x ∈ R^K),

i.e. ‖(W - Ŵ) Xᵀ‖² / n summed over rows. Round-to-nearest minimizes ‖W - Ŵ‖ instead, which is
the same thing only when the input features are uncorrelated and equally scaled.

Everything here is a pure function of tensors (no hooks, no modules): `accumulate_hessian`
builds `H` from calibration activations, `gptq_quantize` turns `(W, H)` into the same
`PackedWeight` that `rtn_quantize` returns, so `QuantLinear`, the kernels and the loader read
a GPTQ weight unchanged. Codes and scales come from `primitives` (`choose_qparams`, `quantize`,
`dequantize`), so there is exactly one rounding rule: the `Ŵ` GPTQ feeds its error back from is
bit for bit what `dequantize` (and `kernels.dequantize_packed` in float32) reconstructs.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from compress.errors import CompressError
from compress.quant.config import PER_CHANNEL
from compress.quant.packing import PackedWeight
from compress.quant.primitives import (
    QParams,
    QuantSpec,
    RangeSearch,
    choose_qparams,
    dequantize,
)

logger = logging.getLogger(__name__)

# Dampening is raised ×10 per failed Cholesky up to this fraction of mean(diag H). A Hessian
# that is not positive definite even with 10× its average diagonal added is not a Hessian of
# real activations (it is far from positive semi-definite), so we stop and say so.
MAX_DAMP = 10.0
DAMP_GROWTH = 10.0
# Where the caller asked for no dampening at all and the Cholesky fails, start raising here.
FIRST_NONZERO_DAMP = 1e-4


class GPTQError(CompressError):
    """GPTQ could not produce a finite result (a Hessian no dampening makes usable)."""


@dataclass(frozen=True)
class GPTQResult:
    """What `gptq_quantize` produced.

    `error` is the GPTQ objective the algorithm minimized, summed over output rows:
    ½ Σ_rows (w - ŵ)(H + λI)(w - ŵ)ᵀ with the dampened Hessian (dead columns repaired), which
    is ‖(W - Ŵ) Xᵀ‖² / n when `H = 2/n XᵀX` and the dampening is small. `damp` is the
    dampening finally used, as a fraction of mean(diag H) (same unit as `damp_percent`), so a
    value above the requested one means the Cholesky needed more. `dead_columns` counts input
    channels whose calibration inputs were all zero (H[i, i] == 0).
    """

    packed: PackedWeight
    error: float
    damp: float
    dead_columns: int


# --------------------------------------------------------------------------------------------
# The Hessian


def accumulate_hessian(
    hessian: torch.Tensor | None, inputs: torch.Tensor, count: int
) -> tuple[torch.Tensor, int]:
    """Fold a batch of layer inputs `(..., K)` into the running `H = 2/n Σ x xᵀ` (float32).

    `count` is the number of rows already in `hessian` (0 with `hessian=None`). The old mean is
    rescaled by `count / (count + rows)` and the new rows enter pre-scaled by
    `sqrt(2 / (count + rows))`, so `H` stays a mean of O(1) magnitude however many rows are
    seen: a plain float32 sum would grow with n and lose the small contributions of late rows.
    Returns the updated `(H, count + rows)`; the input `hessian` is not modified.
    """
    k = inputs.shape[-1]
    if hessian is not None and tuple(hessian.shape) != (k, k):
        raise ValueError(f"hessian of shape {tuple(hessian.shape)} does not match {k} features")
    if count < 0 or (hessian is None and count != 0):
        raise ValueError(f"count must be 0 without a hessian and ≥ 0 with one, got {count}")
    rows = inputs.reshape(-1, k).to(torch.float32)
    if hessian is None:
        hessian = torch.zeros(k, k, dtype=torch.float32, device=inputs.device)
    total = count + rows.shape[0]
    if rows.shape[0] == 0:
        return hessian.clone(), count
    scaled = rows * math.sqrt(2.0 / total)
    updated = hessian.to(torch.float32) * (count / total)
    updated.addmm_(scaled.t(), scaled)
    return updated, total


# --------------------------------------------------------------------------------------------
# Pieces of the algorithm


def _repair_dead_columns(
    weight: torch.Tensor, hessian: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Input channels that never fired (H[i, i] == 0): H[i, i] = 1, the weights kept.

    The objective cannot place these weights (they do not affect the calibration outputs).
    Reference GPTQ zeroes them; we keep them, because a channel that is silent on the
    calibration text may well fire in deployment (an all-zero calibration batch would otherwise
    zero the whole layer). With a unit diagonal and no coupling to other columns they receive
    no error feedback and are simply rounded to nearest on their group's grid.
    """
    dead = torch.diagonal(hessian) == 0
    count = int(dead.sum())
    if count:
        hessian[dead, dead] = 1.0
        logger.warning(
            "GPTQ: %d of %d input channels saw only zero calibration inputs; "
            "their weights are rounded to nearest",
            count,
            hessian.shape[0],
        )
    return weight, hessian, count


def _upper_cholesky_of_inverse(hessian: torch.Tensor, damp: float) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor `U` of `(H + λI)⁻¹` (`UᵀU = (H + λI)⁻¹`), λ = damp · mean(diag H).

    Computed in float64: the factor's small diagonal entries divide the error feedback, so
    float32 round-off here would be amplified. If a factorization fails (H not positive
    definite: rank-deficient calibration, float32 accumulation error) the dampening is raised
    ×10, with a warning, up to `MAX_DAMP`; returns the factor (float32) and the damp used.
    """
    h64 = hessian.to(torch.float64)
    mean_diag = float(torch.diagonal(h64).mean())
    eye = torch.eye(h64.shape[0], dtype=torch.float64, device=h64.device)
    while True:
        factor = _try_factor(h64 + (damp * mean_diag) * eye)
        if factor is not None:
            return factor.to(torch.float32), damp
        raised = damp * DAMP_GROWTH if damp > 0 else FIRST_NONZERO_DAMP
        if raised > MAX_DAMP:
            raise GPTQError(
                f"Hessian is not positive definite even with dampening {damp:g} × mean(diag H) "
                "(calibration inputs contain NaN/Inf, or the Hessian is corrupt)"
            )
        logger.warning(
            "GPTQ: Cholesky failed with dampening %g; raising it to %g × mean(diag H)",
            damp,
            raised,
        )
        damp = raised


def _try_factor(damped: torch.Tensor) -> torch.Tensor | None:
    """Upper Cholesky factor of `damped⁻¹`, or None if any step is not positive definite."""
    lower, info = torch.linalg.cholesky_ex(damped)
    if int(info) != 0:
        return None
    inverse = torch.cholesky_inverse(lower)
    upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
    if int(info) != 0 or not bool(torch.isfinite(upper).all()):
        return None
    return upper


def _column_spec(spec: QuantSpec) -> QuantSpec:
    """The spec that quantizes one column `(N, 1)` with its `(N, 1)` qparams."""
    return QuantSpec(bits=spec.bits, group_size=PER_CHANNEL, symmetric=spec.symmetric)


def _current_group_columns(
    weight: torch.Tensor,
    block: torch.Tensor,
    block_errors: torch.Tensor,
    hinv: torch.Tensor,
    block_start: int,
    offset: int,
    stop: int,
) -> torch.Tensor:
    """Columns `[block_start + offset, stop)` with all error feedback so far applied.

    Inside the current block that is the working copy `block`; columns past the block have
    not yet received the block's lazy batch update, so the pending part from the `offset`
    columns already quantized in this block is applied here. (Reference GPTQ reads the
    global weight instead, which misses that pending update when a group starts mid-block.)
    """
    block_end = block_start + block.shape[1]
    inside = block[:, offset : min(stop, block_end) - block_start]
    if stop <= block_end:
        return inside
    pending = block_errors[:, :offset] @ hinv[block_start : block_start + offset, block_end:stop]
    return torch.cat((inside, weight[:, block_end:stop] - pending), dim=1)


def _check_args(
    weight: torch.Tensor, hessian: torch.Tensor, spec: QuantSpec, block_size: int, damp: float
) -> None:
    if weight.ndim != 2:
        raise ValueError(f"weight must be 2-D (N, K), got shape {tuple(weight.shape)}")
    k = weight.shape[1]
    if tuple(hessian.shape) != (k, k):
        raise ValueError(f"hessian must be ({k}, {k}), got {tuple(hessian.shape)}")
    if not spec.divides(k):
        raise ValueError(f"group_size {spec.group_size} does not divide in_features {k}")
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    if not damp >= 0:
        raise ValueError(f"damp_percent must be ≥ 0, got {damp}")
    if not bool(torch.isfinite(hessian).all()):
        raise GPTQError("Hessian contains NaN or Inf (non-finite calibration activations?)")
    if not bool(torch.isfinite(weight).all()):
        raise GPTQError("weight contains NaN or Inf")


# --------------------------------------------------------------------------------------------
# The algorithm


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    spec: QuantSpec,
    scale_dtype: torch.dtype,
    *,
    block_size: int = 128,
    damp_percent: float = 0.01,
    act_order: bool = False,
    search: RangeSearch | None = None,
) -> GPTQResult:
    """(N, K) weight + (K, K) Hessian → the packed format of `rtn_quantize`, GPTQ-rounded.

    Columns are processed left to right in blocks of `block_size`: inside a block each
    column's error is fed back to the block's remaining columns at once, and to the columns
    past the block in one matrix product when the block ends (the "lazy batch" update, which
    is mathematically identical and turns K rank-1 updates of the whole weight into K/B
    matrix products).

    Quantization parameters: per channel (`group_size=-1`) they come from the whole weight
    before any update, as RTN's. With groups, a group's scale and
    zero point are chosen from the *current*, error-updated weights of its columns when the
    loop reaches its first column (standard GPTQ), so the grid covers what will be rounded.

    `act_order=True` processes columns in order of decreasing `diag(H)` (the most active
    inputs first, while the most unquantized columns remain to absorb their error) with
    *static groups*: every group's qparams are computed up front from the un-permuted weight's
    consecutive columns, before any update. Choosing them during the permuted loop instead
    would make a "group" the next `group_size` columns *in activation order*, i.e. a scattered
    set of original columns; storing that needs a per-column group index (`g_idx`) and a
    gather at run time, which our packed layout, kernels and loader do not have. With static
    groups each stored group still covers consecutive original columns, the codes are simply
    un-permuted at the end, and the result is an ordinary `PackedWeight`. The price is that a
    group's grid is fixed before the updates, so an updated weight may clip at the grid's edge.

    `search` (the MSE observer, `primitives.RangeSearch`) picks each group's range by least
    quantization error weighted by the Hessian diagonal, instead of min/max.

    Raises `ValueError` on inconsistent shapes or arguments and `GPTQError` when no result
    with only finite values can be produced.
    """
    _check_args(weight, hessian, spec, block_size, damp_percent)
    n, k = weight.shape
    group_len = spec.group_len(k)
    grouped = spec.group_size != PER_CHANNEL
    w = weight.detach().to(torch.float32).clone()
    h = hessian.detach().to(device=w.device, dtype=torch.float32).clone()
    w, h, dead = _repair_dead_columns(w, h)

    # Each input feature's weight in the range search: its Hessian diagonal (how much an error
    # there moves the outputs).
    importance = torch.diagonal(h).clone()
    # Qparams fixed up front: per channel always, and every group under act_order.
    static_qparams = (
        choose_qparams(w, spec, scale_dtype, search=search, importance=importance)
        if (act_order or not grouped)
        else None
    )
    perm = (
        torch.argsort(torch.diagonal(h), descending=True, stable=True)
        if act_order
        else torch.arange(k, device=w.device)
    )
    if act_order:
        w = w[:, perm]
        h = h[perm][:, perm]
    hinv, damp = _upper_cholesky_of_inverse(h, damp_percent)
    del h

    codes = torch.zeros(n, k, dtype=torch.int32, device=w.device)
    losses = torch.zeros(n, k, dtype=torch.float32, device=w.device)
    # The original group of each (permuted) column; a list, so the loop never syncs a GPU.
    group_of: list[int] = (perm // group_len).tolist()
    num_groups = spec.num_groups(k)
    if static_qparams is not None:
        scales, zeros = static_qparams.scale, static_qparams.zero
    else:
        scales = torch.zeros(n, num_groups, dtype=scale_dtype, device=w.device)
        zeros = torch.zeros(n, num_groups, dtype=torch.int32, device=w.device)
    qparams = QParams(scale=scales, zero=zeros)  # filled in place as groups are reached
    # float32 copies for the column loop, one row per group (kept in step with `scales` and
    # `zeros`), so quantizing a column is a handful of ops on contiguous memory. The arithmetic
    # is that of primitives.quantize/dequantize: round(w / s) + z clamped to the grid, and
    # (q − z)·s, all in float32, so the value the error feedback uses is exactly what the
    # stored codes reconstruct.
    scale_rows = scales.t().to(torch.float32).contiguous()  # (G, N)
    zero_rows = zeros.t().to(torch.float32).contiguous()

    for start in range(0, k, block_size):
        end = min(start + block_size, k)
        # The block transposed: row i is column start + i, so each column's ops (and the
        # rank-1 update of the columns after it) read contiguous memory.
        block = w[:, start:end].t().contiguous()  # (b, N)
        errors = torch.zeros_like(block)
        block_codes = torch.zeros_like(block)
        hinv_block = hinv[start:end, start:end]
        for i in range(end - start):
            col = start + i
            if static_qparams is None and col % group_len == 0:
                current = _current_group_columns(
                    w, block.t(), errors.t(), hinv, start, i, col + group_len
                )
                chosen = choose_qparams(
                    current,
                    _column_spec(spec),
                    scale_dtype,
                    search=search,
                    importance=importance[col : col + group_len],  # no permutation here
                )
                g = col // group_len
                scales[:, g] = chosen.scale[:, 0]
                zeros[:, g] = chosen.zero[:, 0]
                scale_rows[g] = scales[:, g].to(torch.float32)
                zero_rows[g] = zeros[:, g].to(torch.float32)
            group = group_of[col]
            s, z = scale_rows[group], zero_rows[group]
            column = block[i]
            q = torch.round(column / s).add_(z).clamp_(0, spec.qmax)
            err = (column - (q - z).mul_(s)).div_(hinv_block[i, i])
            block_codes[i] = q
            block[i + 1 :].addr_(hinv_block[i, i + 1 :], err, alpha=-1.0)
            errors[i] = err
        codes[:, start:end] = block_codes.t().to(torch.int32)
        losses[:, start:end] = errors.t().square()
        w[:, end:].addmm_(errors.t(), hinv[start:end, end:], alpha=-1.0)

    if act_order:
        codes = codes[:, torch.argsort(perm)]
    error = 0.5 * float(losses.sum(dtype=torch.float64))
    _check_finite(codes, qparams, spec, error)
    packed = PackedWeight.from_quantized(codes, scales, zeros, spec.bits, spec.symmetric)
    return GPTQResult(packed=packed, error=error, damp=damp, dead_columns=dead)


def _check_finite(codes: torch.Tensor, qparams: QParams, spec: QuantSpec, error: float) -> None:
    """The stored weight must reconstruct to finite values (and the reported loss be finite)."""
    reconstructed = dequantize(codes, qparams, spec)
    if not (math.isfinite(error) and bool(torch.isfinite(reconstructed).all())):
        raise GPTQError(f"GPTQ produced non-finite values (error={error}); this is a bug")
