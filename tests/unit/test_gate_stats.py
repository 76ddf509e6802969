"""The gate's statistics: intervals, Holm, planning, sequential bounds, and error rates checked
by simulation on paired 0/1 items with a known true drop.

The simulated task looks like GSM8K: 1,319 items, the two models disagree on 12 % of them, a
budget of 3 points. Each simulation draws every item's (baseline, artifact) pair afresh.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from compress.evaluate.stats import (
    binary_sd,
    holm,
    items_needed,
    look_sizes,
    paired_estimate,
    sequential_bounds,
    sequential_test,
    weighted_estimate,
)

ITEMS, DISCORDANCE, BUDGET, ALPHA = 1319, 0.12, 0.03, 0.05
SIMULATIONS = 2000


def simulate_pairs(
    rng: np.random.Generator, n: int, drop: float, discordance: float = DISCORDANCE
) -> tuple[np.ndarray, np.ndarray]:
    """n paired 0/1 items: P(base right, artifact wrong) − P(base wrong, artifact right) = drop."""
    p10, p01 = (discordance + drop) / 2, (discordance - drop) / 2
    cell = rng.choice(4, size=n, p=[p10, p01, 0.6 - p10, 0.4 - p01])
    baseline = np.isin(cell, (0, 2)).astype(float)  # cells: 10, 01, 11, 00
    artifact = np.isin(cell, (1, 2)).astype(float)
    return baseline, artifact


def fixed_ship_rate(drop: float, n: int = ITEMS, seed: int = 0) -> float:
    rng = np.random.default_rng(seed)
    shipped = 0
    for _ in range(SIMULATIONS):
        estimate = paired_estimate(*simulate_pairs(rng, n, drop))
        shipped += estimate.p_within(BUDGET) <= ALPHA
    return shipped / SIMULATIONS


def test_agresti_min_interval_by_hand():
    # 10 pairs: 3 only the baseline got right, 1 only the artifact, 6 concordant.
    baseline = [1, 1, 1, 0, 1, 1, 0, 0, 1, 0]
    artifact = [0, 0, 0, 1, 1, 1, 0, 0, 1, 0]
    estimate = paired_estimate(baseline, artifact)
    assert estimate.method == "agresti-min"
    assert estimate.drop == pytest.approx(0.2)
    p10, p01 = 3.5 / 12, 1.5 / 12
    assert estimate.center == pytest.approx(p10 - p01)
    assert estimate.se == pytest.approx(math.sqrt((p10 + p01 - (p10 - p01) ** 2) / 12))
    assert (estimate.baseline_only, estimate.artifact_only) == (3, 1)
    # No discordant pair at all still leaves an honest interval (not a zero-width one).
    same = paired_estimate([1, 0] * 10, [1, 0] * 10)
    assert same.drop == 0 and same.se > 0


def test_graded_items_use_the_t_interval():
    baseline, artifact = [0.9, 0.5, 0.7, 0.4], [0.8, 0.5, 0.4, 0.5]
    estimate = paired_estimate(baseline, artifact)
    diffs = np.subtract(baseline, artifact)
    assert estimate.method == "t" and estimate.df == 3
    assert estimate.se == pytest.approx(diffs.std(ddof=1) / 2)
    assert estimate.upper(0.95) == pytest.approx(diffs.mean() + 2.3533634 * estimate.se)


def test_weighted_estimate_reduces_to_the_mean_with_equal_weights():
    values = [0.1, 0.3, 0.2, 0.6]
    estimate = weighted_estimate(values, [5, 5, 5, 5])
    assert estimate.center == pytest.approx(np.mean(values))
    assert estimate.se == pytest.approx(np.std(values, ddof=1) / 2)


def test_holm_adjusted_p_values():
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.5]) == [0.5]
    assert holm([0.6, 0.6]) == [1.0, 1.0]


def test_sequential_bounds_match_the_published_obrien_fleming_values():
    # Lan–DeMets O'Brien–Fleming, 4 equal looks, one-sided 0.025 (gsDesign, Jennison & Turnbull).
    bounds = sequential_bounds((0.25, 0.5, 0.75, 1.0), 0.025)
    assert bounds == pytest.approx([4.3326, 2.9631, 2.3590, 2.0141], abs=2e-3)
    assert sequential_bounds((1.0,), 0.05) == pytest.approx([1.6449], abs=1e-4)


def test_sequential_bounds_spend_exactly_alpha_over_all_looks():
    fractions = (0.2, 0.45, 0.7, 1.0)
    bounds = np.array(sequential_bounds(fractions, ALPHA))
    rng = np.random.default_rng(1)
    t = np.array(fractions)
    paths = (rng.standard_normal((200_000, 4)) * np.sqrt(np.diff(t, prepend=0))).cumsum(1)
    crossed = ((paths / np.sqrt(t)) >= bounds).any(axis=1).mean()
    assert crossed == pytest.approx(ALPHA, abs=0.002)  # MC sd ≈ 0.0005


def test_bad_looks_are_refused():
    with pytest.raises(ValueError, match="increase"):
        sequential_bounds((0.5, 0.5, 1.0), ALPHA)
    with pytest.raises(ValueError, match="fraction 1"):
        sequential_bounds((0.5, 0.9), ALPHA)


def test_the_non_inferiority_gate_rarely_ships_an_artifact_over_budget():
    over = fixed_ship_rate(BUDGET + 0.01)
    at_budget = fixed_ship_rate(BUDGET, seed=1)
    power = fixed_ship_rate(0.0, seed=2)
    print(
        f"\nfixed {ITEMS} items, {SIMULATIONS} simulations: ships at true drop "
        f"budget+1 pt {over:.2%}, at the budget {at_budget:.2%}; power at drop 0 {power:.2%}"
    )
    assert over <= ALPHA
    # At the budget itself the test is calibrated: close to alpha, not far below it.
    assert 0.025 <= at_budget <= ALPHA + 0.015  # MC sd ≈ 0.005
    assert power >= 0.8


def test_planned_items_give_the_planned_power():
    drop = 0.0
    n = items_needed(binary_sd(DISCORDANCE, drop), BUDGET - drop, ALPHA, power=0.8)
    power = fixed_ship_rate(drop, n=n, seed=3)
    print(f"\nplanned {n} items for 80% power at drop 0: simulated power {power:.2%}")
    assert 0.75 <= power <= 0.86
    assert items_needed(0.3, 0.0, ALPHA) is None  # a drop on the budget is never decided


def _sequential_runs(drop: float, seed: int) -> tuple[float, float]:
    """(ship rate, mean items used) of the sequential test over SIMULATIONS runs."""
    rng = np.random.default_rng(seed)
    sizes = look_sizes(ITEMS, looks=5, first=300)
    shipped, used = 0, 0
    for _ in range(SIMULATIONS):
        decision = sequential_test(*simulate_pairs(rng, ITEMS, drop), BUDGET, sizes, ALPHA)
        shipped += decision.outcome == "ship"
        used += decision.items_used
    return shipped / SIMULATIONS, used / SIMULATIONS


def test_sequential_stopping_keeps_the_error_rate_and_uses_fewer_items():
    over_rate, over_items = _sequential_runs(BUDGET + 0.01, seed=4)
    at_rate, _ = _sequential_runs(BUDGET, seed=5)
    power, good_items = _sequential_runs(0.0, seed=6)
    print(
        f"\nsequential (5 looks from 300 items) vs fixed {ITEMS}: ships at budget+1 pt "
        f"{over_rate:.2%} using {over_items:.0f} items on average; at the budget {at_rate:.2%}; "
        f"power at drop 0 {power:.2%} using {good_items:.0f} items on average"
    )
    assert over_rate <= ALPHA
    assert at_rate <= ALPHA + 0.01
    assert over_items < ITEMS and good_items < 0.8 * ITEMS
    assert power >= 0.8


def test_look_sizes():
    assert look_sizes(1319, 5, 200) == [200, 480, 760, 1039, 1319]
    assert look_sizes(100, 4, 500) == [100]  # fewer items than the first look: one look
