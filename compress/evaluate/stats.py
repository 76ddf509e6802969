"""Paired statistics for the release gate: intervals, tests, sample sizes, sequential bounds.

Everything is a pure function of per-item (or per-window) numbers, so a stored report can be
re-decided exactly (`compress gate --replay`) and the error rates can be checked by simulation
(tests/unit/test_gate_stats.py).

Conventions: `drop` = baseline − artifact (positive = the artifact is worse); `budget` is the
largest drop the recipe accepts; tests are one-sided at level `alpha` (confidence 1 − alpha).

- 0/1 items (accuracy, exact match): the paired difference with the Agresti–Min adjustment
  (half a pseudo-count in each cell of the 2×2 table), whose Wald interval keeps its coverage
  even with few discordant pairs, where the plain one claims certainty from zero variance.
  Only discordant pairs (one model right, the other wrong) move it.
- Graded items (F1, BLEU) and per-window signals: the mean difference with a Student-t bound.
- Several tasks gate together. Shipping needs every task inside its budget: an intersection-
  union test, whose chance of shipping wrongly is at most `alpha` with no adjustment. Rejecting
  needs one task confidently over budget: a union of claims, so those p-values are Holm-
  adjusted, and the chance of rejecting a good artifact is at most `alpha` too.
- Sequential evaluation: items come in batches and the test is repeated at each look with
  Lan–DeMets O'Brien–Fleming-type alpha spending, so the error rate over all looks stays at
  `alpha`; boundaries are computed by recursive numerical integration over the looks.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from statistics import NormalDist
from typing import Any, Literal

import numpy as np
from scipy import optimize
from scipy import stats as sps

_NORMAL = NormalDist()

Method = Literal["agresti-min", "t"]


@dataclass(frozen=True)
class PairedEstimate:
    """The drop (baseline − artifact) on paired items, with what its bounds need."""

    n: int
    drop: float  # the plain mean of the per-item differences (what the report shows)
    center: float  # the estimate the bounds are built around (adjusted for 0/1 items)
    se: float  # standard error of `center`
    method: Method
    baseline_only: int  # items only the baseline got right (0/1) / scored higher (graded)
    artifact_only: int

    @property
    def df(self) -> int | None:
        """Degrees of freedom of the t reference; None for the normal one."""
        return self.n - 1 if self.method == "t" else None

    def quantile(self, level: float) -> float:
        return _NORMAL.inv_cdf(level) if self.df is None else float(sps.t.ppf(level, self.df))

    def upper(self, confidence: float) -> float:
        """One-sided upper confidence bound of the drop."""
        return self.center + self.quantile(confidence) * self.se

    def lower(self, confidence: float) -> float:
        return self.center - self.quantile(confidence) * self.se

    def interval(self, confidence: float) -> tuple[float, float]:
        """Two-sided interval at `confidence` (what the report prints)."""
        half = self.quantile(0.5 + confidence / 2) * self.se
        return self.center - half, self.center + half

    def z_within(self, budget: float) -> float:
        """How many standard errors the estimate sits below the budget (+: inside)."""
        if self.se == 0:
            return math.copysign(math.inf, budget - self.center) if budget != self.center else 0
        return (budget - self.center) / self.se

    def p_within(self, budget: float) -> float:
        """p-value of H0 "drop ≥ budget": small = confident the drop is inside the budget."""
        return self._sf(self.z_within(budget))

    def p_exceeds(self, budget: float) -> float:
        """p-value of H0 "drop ≤ budget": small = confident the drop exceeds the budget."""
        return self._sf(-self.z_within(budget))

    def _sf(self, z: float) -> float:
        if math.isinf(z):
            return 0.0 if z > 0 else 1.0
        return 1 - _NORMAL.cdf(z) if self.df is None else float(sps.t.sf(z, self.df))

    @property
    def sd(self) -> float:
        """Per-item standard deviation of the difference (for sample-size planning)."""
        return self.se * math.sqrt(self.n + (2 if self.method == "agresti-min" else 0))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def is_binary(values: Sequence[float]) -> bool:
    return all(v in (0.0, 1.0) for v in values)


def paired_estimate(baseline: Sequence[float], artifact: Sequence[float]) -> PairedEstimate:
    """The drop on items given in the same order for both models (at least two)."""
    if len(baseline) != len(artifact):
        raise ValueError(f"{len(baseline)} baseline items vs {len(artifact)} artifact items")
    n = len(baseline)
    if n < 2:
        raise ValueError(f"{n} paired item(s): an interval needs at least 2")
    base = np.asarray(baseline, dtype=np.float64)
    art = np.asarray(artifact, dtype=np.float64)
    diffs = base - art
    drop = float(diffs.mean())
    baseline_only, artifact_only = int((diffs > 0).sum()), int((diffs < 0).sum())
    if is_binary(baseline) and is_binary(artifact):
        # Agresti & Min (2005): add 0.5 to each of the four cells, then the Wald interval.
        total = n + 2
        p10 = (baseline_only + 0.5) / total
        p01 = (artifact_only + 0.5) / total
        center = p10 - p01
        se = math.sqrt(max(p10 + p01 - center**2, 0.0) / total)
        return PairedEstimate(n, drop, center, se, "agresti-min", baseline_only, artifact_only)
    se = float(diffs.std(ddof=1)) / math.sqrt(n)
    return PairedEstimate(n, drop, drop, se, "t", baseline_only, artifact_only)


def weighted_estimate(values: Sequence[float], weights: Sequence[float]) -> PairedEstimate:
    """A weighted mean over windows (e.g. per-window KL, weighted by scored tokens) with the
    ratio-estimator standard error and a t reference on n − 1 degrees of freedom."""
    x = np.asarray(values, dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64)
    n = len(x)
    if n < 2:
        raise ValueError(f"{n} window(s): an interval needs at least 2")
    mean = float((w * x).sum() / w.sum())
    var = n / (n - 1) * float((w**2 * (x - mean) ** 2).sum()) / float(w.sum()) ** 2
    return PairedEstimate(n, mean, mean, math.sqrt(var), "t", 0, 0)


# --------------------------------------------------------------------------- several tasks


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm step-down adjusted p-values (same order as given)."""
    m = len(p_values)
    order = sorted(range(m), key=lambda i: p_values[i])
    adjusted = [0.0] * m
    running = 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[index]))
        adjusted[index] = running
    return adjusted


# --------------------------------------------------------------------------- planning


def items_needed(sd: float, margin: float, alpha: float, power: float = 0.8) -> int | None:
    """Items for a one-sided test at `alpha` to decide with probability `power` when the
    true drop is `margin` away from the budget and items differ with standard deviation `sd`.
    None when the margin is zero (no sample size separates a drop equal to the budget)."""
    if margin == 0:
        return None
    if sd == 0:
        return 2
    z = _NORMAL.inv_cdf(1 - alpha) + _NORMAL.inv_cdf(power)
    return max(2, math.ceil((z * sd / abs(margin)) ** 2))


def binary_sd(discordance: float, drop: float) -> float:
    """Per-item sd of a 0/1 paired difference: discordance = P(the models disagree)."""
    return math.sqrt(max(discordance - drop**2, 0.0))


# --------------------------------------------------------------------------- sequential


def obrien_fleming_spending(fraction: float, alpha: float) -> float:
    """Lan–DeMets O'Brien–Fleming-type spending: alpha spent by information `fraction`.

    It spends almost nothing at early looks, so the last look's bound stays close to the
    fixed-sample one and a run that goes to the end loses little power."""
    if fraction <= 0:
        return 0.0
    z = _NORMAL.inv_cdf(1 - alpha / 2)
    return 2 * (1 - _NORMAL.cdf(z / math.sqrt(min(fraction, 1.0))))


@functools.lru_cache(maxsize=64)
def sequential_bounds(fractions: tuple[float, ...], alpha: float) -> tuple[float, ...]:
    """One-sided z boundaries u_k at information `fractions` (increasing, last = 1) such that
    a standardized statistic with independent increments crosses some u_k with probability
    `alpha` under the null (alpha spent per `obrien_fleming_spending`).

    Recursive numerical integration on the score scale S_k = Z_k √t_k: the density of S among
    paths still inside is carried from look to look on a grid, convolved with the increment's
    normal kernel (Armitage, McPherson & Rowe, 1969)."""
    t = [float(f) for f in fractions]
    if not t or any(b <= a for a, b in itertools.pairwise(t)) or t[0] <= 0:
        raise ValueError(f"information fractions must increase from above 0: {fractions}")
    if abs(t[-1] - 1) > 1e-9:
        raise ValueError(f"the last look must be the full sample (fraction 1), not {t[-1]}")
    grid = np.linspace(-9.0, 9.0, 3601)  # S stays within ±9 sd of 0 for every t ≤ 1
    step = grid[1] - grid[0]
    bounds = [_NORMAL.inv_cdf(1 - obrien_fleming_spending(t[0], alpha))]
    inside = grid < bounds[0] * math.sqrt(t[0])
    density = np.where(inside, sps.norm.pdf(grid, scale=math.sqrt(t[0])), 0.0)
    spent = obrien_fleming_spending(t[0], alpha)
    for previous, now in itertools.pairwise(t):
        scale = math.sqrt(now - previous)
        target = obrien_fleming_spending(now, alpha) - spent
        mass = density * step  # probability of each grid cell of S at the previous look

        def excess(z: float, mass=mass, scale=scale, now=now, target=target) -> float:
            exit_probability = (mass * sps.norm.sf((z * math.sqrt(now) - grid) / scale)).sum()
            return float(exit_probability) - target

        bound = optimize.brentq(excess, -10.0, 40.0, xtol=1e-7)
        bounds.append(float(bound))
        spent += target
        kernel = sps.norm.pdf((grid[:, None] - grid[None, :]) / scale) / scale
        density = np.where(grid < bound * math.sqrt(now), kernel @ mass, 0.0)
    return tuple(bounds)


@dataclass(frozen=True)
class LookBounds:
    """The z thresholds of one look: ship when `z_within` ≥ `ship`, reject when
    −`z_within` ≥ `reject` (the reject side at its own, possibly Holm/Bonferroni-split level)."""

    ship: float
    reject: float


def look_bounds(sizes: Sequence[int], alpha: float, reject_alpha: float) -> list[LookBounds]:
    """Bounds for looks after `sizes` items (the last = all). Each side is computed as if
    the other did not stop the run (non-binding), which only makes it conservative."""
    fractions = tuple(n / sizes[-1] for n in sizes)
    ship = sequential_bounds(fractions, alpha)
    reject = sequential_bounds(fractions, reject_alpha)
    return [LookBounds(s, r) for s, r in zip(ship, reject, strict=True)]


def look_outcome(estimate: PairedEstimate, budget: float, bounds: LookBounds) -> str | None:
    """ "ship", "reject", or None (keep going / inconclusive at the last look)."""
    z = estimate.z_within(budget)
    if z >= bounds.ship:
        return "ship"
    if -z >= bounds.reject:
        return "reject"
    return None


@dataclass(frozen=True)
class SequentialDecision:
    """Where a sequential test of one task stopped."""

    outcome: Literal["ship", "reject", "inconclusive"]
    look: int  # 1-based
    items_used: int
    items_planned: int


def sequential_test(
    baseline: Sequence[float],
    artifact: Sequence[float],
    budget: float,
    sizes: Sequence[int],
    alpha: float,
) -> SequentialDecision:
    """One task's group-sequential non-inferiority test over items in the order given (the
    order items would be scored in): look k sees the first sizes[k] pairs."""
    bounds = look_bounds(sizes, alpha, alpha)
    for look, (size, bound) in enumerate(zip(sizes, bounds, strict=True), start=1):
        outcome = look_outcome(paired_estimate(baseline[:size], artifact[:size]), budget, bound)
        if outcome is not None:
            return SequentialDecision(outcome, look, size, sizes[-1])  # type: ignore[arg-type]
    return SequentialDecision("inconclusive", len(sizes), sizes[-1], sizes[-1])


def look_sizes(total: int, looks: int, first: int) -> list[int]:
    """Item counts at each look: the first at `first` (at least), then evenly up to `total`."""
    first = min(max(first, 2), total)
    if looks <= 1 or first >= total:
        return [total]
    steps = np.linspace(first, total, looks)
    return sorted({round(float(s)) for s in steps})
