"""The walk along the Pareto front, and the error rate of the whole search.

**Walk.** The front is sorted from small to large; the KL of its allocations falls as they grow
(predicted exactly, measured nearly). The walk bisects on the front's index for the smallest
allocation that passes: `first` is probed first (the smallest whose predicted KL is within the
budget), then each probe halves the interval between the largest allocation known to fail and
the smallest known to pass, until `max_candidates` are built or the two are neighbours. With
several workers, each round probes as many points, splitting the interval evenly.

**Error rate.** Judging many candidates on the same windows and keeping the smallest that
passes inflates false passes: each probe is another chance for noise to let an allocation whose
true KL exceeds the budget through. So the search's verdict is only a choice: the chosen
allocation is then judged once more, by the recipe's gate, on windows and task items the search
never used. That final judgement is a single test of a candidate chosen independently of its
data, so its false-ship rate is the gate's own (at most 1 − confidence at the budget's edge
under non-inferiority; up to one half under the point rule),
however many candidates the search tried. `simulate_false_ships` checks that by simulation and
shows what shipping the search's own pick would give.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from compress.evaluate.stats import weighted_estimate


@dataclass(frozen=True)
class Probe:
    """One front index built and judged: whether it passed, and the statistic the gate judged
    (the KL's upper bound under non-inferiority, its mean under the point rule) when known."""

    index: int
    passed: bool
    value: float | None = None


# (probes so far, largest index known to fail, smallest known to pass, how many) → indices
Propose = Callable[[list[Probe], int, int, int], list[int]]


def round_indices(failing: int, passing: int, count: int) -> list[int]:
    """Up to `count` indices strictly between `failing` and `passing`, evenly spaced (the
    midpoint for one)."""
    span = passing - failing
    picks = {failing + round(span * (j + 1) / (count + 1)) for j in range(count)}
    return sorted(i for i in picks if failing < i < passing)


def bisection(_probes: list[Probe], failing: int, passing: int, count: int) -> list[int]:
    return round_indices(failing, passing, count)


MAX_GUIDED_STREAK = 3  # probes in a row on one side of the budget before the guide bisects


def predicted_guide(predicted: Sequence[float], budget: float) -> Propose:
    """Probes where the corrected prediction meets the budget: the front's predicted KL times
    the ratio judged / predicted of the probes at the bracket's ends (their geometric mean when
    both are known), so a prediction off by a steady factor costs one probe, not a bisection of
    the whole front. Safeguarded: every probe cuts at least a quarter off the bracket, probes
    in a row on one side aim twice as far each time, and after `MAX_GUIDED_STREAK` of them, or
    without a ratio, the next round bisects."""

    def ratio(probe: Probe) -> float | None:
        guess = predicted[probe.index]
        return probe.value / guess if probe.value is not None and guess > 0 else None

    def propose(probes: list[Probe], failing: int, passing: int, count: int) -> list[int]:
        ends = [p for p in probes if p.index in (failing, passing)]
        ratios = [r for r in map(ratio, ends) if r is not None and r > 0]
        streak = next(
            (k for k in range(1, len(probes)) if probes[-k - 1].passed != probes[-1].passed),
            len(probes),
        )
        if not ratios or streak > MAX_GUIDED_STREAK:
            return round_indices(failing, passing, count)
        scale = math.exp(sum(math.log(r) for r in ratios) / len(ratios))
        # Approaching from one side, aim further each time (×2 in KL per extra probe), so a
        # ratio that drifts along the front still brackets the budget in a few probes.
        overshoot = 2.0 ** (streak - 1)
        aim = budget / scale * (overshoot if probes[-1].passed else 1 / overshoot)
        # Each probe cuts at least a quarter off the bracket: where the prediction is flat
        # (many allocations of nearly one predicted KL) the aim can sit at an end forever.
        margin = max(1, (passing - failing) // 4)
        low, high = failing + margin, passing - margin
        picks = []
        for j in range(count):  # several workers: targets spread around the aim
            target = aim * (0.8 ** (j - (count - 1) / 2))
            inside = range(failing + 1, passing)
            index = next((i for i in inside if predicted[i] <= target), passing - 1)
            picks.append(min(max(index, low), high) if low <= high else index)
        picks = sorted({i for i in picks if failing < i < passing})
        return picks or round_indices(failing, passing, count)

    return propose


def walk_front(
    length: int,
    first: int,
    judge: Callable[[list[int]], list[Probe]],
    max_candidates: int,
    parallelism: int = 1,
    propose: Propose = bisection,
) -> list[Probe]:
    """Probes in the order made (module docstring); the answer is the smallest passing index
    among them (`smallest_passing`). `judge(indices)` builds and judges a round of allocations
    (run at once, `parallelism` of them); `propose` picks each later round inside the interval
    between the largest index known to fail and the smallest known to pass (`bisection`:
    evenly, so one per round is bisection; `predicted_guide`: where the corrected prediction
    meets the budget)."""
    if length < 1:
        raise ValueError("the front is empty")
    if not 0 <= first < length:
        raise ValueError(f"first probe {first} is outside the front [0, {length})")
    probes: list[Probe] = []
    failing, passing = -1, length  # `passing` starts past the end: with no pass yet, go up
    indices = [first]
    if parallelism > 1:  # fill the first round around `first`
        others = round_indices(failing, passing, parallelism)
        indices = sorted({first, *[i for i in others if i != first][: parallelism - 1]})
    while indices:
        indices = indices[: max_candidates - len(probes)]
        probes.extend(judge(indices))
        passing = min([passing, *(p.index for p in probes if p.passed)])
        failing = max([failing, *(p.index for p in probes if not p.passed and p.index < passing)])
        if len(probes) >= max_candidates:
            break
        indices = [
            i for i in propose(probes, failing, passing, parallelism) if failing < i < passing
        ]
    return probes


def smallest_passing(probes: Sequence[Probe]) -> int | None:
    passing = [p.index for p in probes if p.passed]
    return min(passing) if passing else None


# --------------------------------------------------------------------------- error rate


@dataclass(frozen=True)
class FalseShipRates:
    """Shares of simulated searches that shipped an allocation whose true KL exceeds the
    budget: with the final confirmation on fresh windows (what `compress search` does), and
    shipping the search's own pick without it."""

    confirmed: float
    unconfirmed: float
    runs: int


def judged(values: np.ndarray, budget: float, confidence: float, rule: str) -> tuple[bool, float]:
    """The gate's rule on per-window KLs (equal windows): (passed, the statistic judged):
    non_inferiority, the one-sided upper bound of the mean within the budget; point, the mean
    itself."""
    estimate = weighted_estimate(values.tolist(), [1.0] * len(values))
    value = estimate.center if rule == "point" else estimate.upper(confidence)
    return value <= budget, value


def simulate_false_ships(
    true_kl: Sequence[float],
    *,
    budget: float,
    confidence: float,
    rule: str,
    search_windows: int,
    confirm_windows: int,
    spread: float,
    max_candidates: int,
    first: int | None = None,
    parallelism: int = 1,
    predicted: Sequence[float] | None = None,
    runs: int = 2000,
    seed: int = 0,
) -> FalseShipRates:
    """The whole procedure, `runs` times, on a front whose allocation i has mean KL
    `true_kl[i]` (decreasing) and per-window KL lognormal around it with coefficient of
    variation `spread` (what the search measured). Each run: bisect with the gate's rule on
    `search_windows` windows from `first` (default: the front's middle), guided by the
    `predicted` KLs as the search is (`predicted_guide`; bisection without them), then judge the
    pick on `confirm_windows` fresh ones."""
    rng = np.random.default_rng(seed)
    truth = np.asarray(true_kl, dtype=np.float64)
    sigma = math.sqrt(math.log1p(spread**2))

    def windows(index: int, count: int) -> np.ndarray:
        # lognormal with mean truth[index] and the given coefficient of variation
        return truth[index] * rng.lognormal(-(sigma**2) / 2, sigma, size=count)

    first = len(truth) // 2 if first is None else first
    propose = bisection if predicted is None else predicted_guide(predicted, budget)

    def probe(index: int) -> Probe:
        passed, value = judged(windows(index, search_windows), budget, confidence, rule)
        return Probe(index, passed, value)

    confirmed = unconfirmed = 0
    for _ in range(runs):
        probes = walk_front(
            len(truth),
            first,
            lambda indices: [probe(i) for i in indices],
            max_candidates,
            parallelism,
            propose,
        )
        pick = smallest_passing(probes)
        if pick is None or truth[pick] <= budget:
            continue
        unconfirmed += 1
        confirmed += judged(windows(pick, confirm_windows), budget, confidence, rule)[0]
    return FalseShipRates(confirmed / runs, unconfirmed / runs, runs)
