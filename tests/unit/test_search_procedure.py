"""The search's walk along the front, its simulated error rate, its recipe section, and how an
allocation becomes a quantize stage."""

from __future__ import annotations

import math

import pytest
import yaml

from compress.errors import RecipeError
from compress.quant.config import PER_CHANNEL, QuantizeConfig
from compress.recipe import parse_recipe
from compress.search.candidates import KEEP_16, Format
from compress.search.config import SearchConfig
from compress.search.procedure import (
    Probe,
    predicted_guide,
    simulate_false_ships,
    smallest_passing,
    walk_front,
)
from compress.search.run import allocation_stages
from compress.search.sensitivity import LayerGroup

# --------------------------------------------------------------------------- walk


@pytest.mark.parametrize("length", [1, 2, 7, 64, 1000])
def test_bisection_finds_the_threshold_of_a_monotone_front(length):
    budget = math.ceil(math.log2(length)) + 2
    for threshold in sorted({0, 1, length // 3, length // 2, length - 1, length}):
        for first in sorted({0, length // 2, length - 1}):
            probes = walk_front(
                length, first, lambda xs, t=threshold: [Probe(i, i >= t) for i in xs], budget
            )
            assert len(probes) <= budget
            assert probes[0].index == first
            expected = None if threshold == length else threshold
            assert smallest_passing(probes) == expected, (threshold, first)


def test_a_short_budget_never_returns_a_failing_index():
    threshold = 700
    probes = walk_front(1000, 100, lambda xs: [Probe(i, i >= threshold) for i in xs], 4)
    assert len(probes) == 4
    assert smallest_passing(probes) >= threshold
    assert len({p.index for p in probes}) == 4  # no allocation built twice


def test_bisection_checks_its_arguments():
    with pytest.raises(ValueError, match="empty"):
        walk_front(0, 0, lambda xs: [Probe(i, True) for i in xs], 3)
    with pytest.raises(ValueError, match="outside"):
        walk_front(5, 5, lambda xs: [Probe(i, True) for i in xs], 3)


@pytest.mark.parametrize("parallelism", [2, 3, 8])
def test_parallel_rounds_find_the_threshold_in_fewer_rounds(parallelism):
    length, threshold = 1000, 613
    rounds: list[list[int]] = []

    def judge(indices: list[int]) -> list[bool]:
        assert len(indices) <= parallelism
        rounds.append(indices)
        return [Probe(i, i >= threshold) for i in indices]

    probes = walk_front(length, 400, judge, 200, parallelism)
    assert smallest_passing(probes) == threshold
    assert 400 in rounds[0]
    bisection_rounds = len(
        walk_front(length, 400, lambda xs: [Probe(i, i >= threshold) for i in xs], 200)
    )
    assert len(rounds) < bisection_rounds


def test_a_prediction_off_by_a_steady_factor_costs_few_probes():
    """The front's predicted KL falls from 1 to 1e-4 over 5,000 points; the measured KL is
    2.5× the prediction. Guided by the corrected prediction the walk finds the threshold in a
    few probes, where bisection of the index needs about log2(5000)."""
    length, budget = 5000, 0.2
    predicted = [10 ** (-4 * i / (length - 1)) for i in range(length)]
    measured = [2.5 * p for p in predicted]
    threshold = next(i for i in range(length) if measured[i] <= budget)

    def judge(indices: list[int]) -> list[Probe]:
        return [Probe(i, measured[i] <= budget, measured[i]) for i in indices]

    first = next(i for i in range(length) if predicted[i] <= budget)
    guided = walk_front(length, first, judge, 6, propose=predicted_guide(predicted, budget))
    bisected = walk_front(length, first, judge, 6)
    assert smallest_passing(guided) == threshold  # six probes, as the demo recipe allows
    assert smallest_passing(bisected) > threshold


def test_a_floor_under_the_prediction_is_bracketed_in_six_probes():
    """Measured = predicted + a floor the per-group sums do not see (bf16 rounding, GPTQ's
    interactions): the ratio grows toward small KLs, so single steps from one side fall short;
    aiming further each time brackets the budget, and six probes land within 0.5 % of the front
    of the threshold, never further than bisection's."""
    length, budget = 5000, 0.2
    predicted = [10 ** (-4 * i / (length - 1)) for i in range(length)]
    measured: list[float] = []

    def judge(indices: list[int]) -> list[Probe]:
        return [Probe(i, measured[i] <= budget, measured[i]) for i in indices]

    first = next(i for i in range(length) if predicted[i] <= budget)
    for floor in (0.05, 0.15):
        measured[:] = [p + floor for p in predicted]
        threshold = next(i for i in range(length) if measured[i] <= budget)
        guided = walk_front(length, first, judge, 6, propose=predicted_guide(predicted, budget))
        bisected = walk_front(length, first, judge, 6)
        found = smallest_passing(guided)
        assert threshold <= found <= min(threshold + 25, smallest_passing(bisected))


def test_the_guide_falls_back_to_bisection_when_the_ratio_misleads():
    """A prediction whose error grows along the front keeps the guided probes on one side;
    the safeguard bisects, so the walk still converges within the bisection's count."""
    length, budget = 1000, 0.2
    predicted = [1 - i / length for i in range(length)]
    measured = [p * (1 + 5 * i / length) for i, p in enumerate(predicted)]
    threshold = next(i for i in range(length) if measured[i] <= budget)

    def judge(indices: list[int]) -> list[Probe]:
        return [Probe(i, measured[i] <= budget, measured[i]) for i in indices]

    probes = walk_front(length, 0, judge, 40, propose=predicted_guide(predicted, budget))
    assert smallest_passing(probes) == threshold
    assert len(probes) <= 2 * math.ceil(math.log2(length)) + 2


# --------------------------------------------------------------------------- error rate


def test_confirmation_holds_false_ships_to_the_gates_rate_at_the_worst_case():
    """Every allocation's true KL just over the budget: each search probe passes with the
    gate's α, so shipping the search's pick would be wrong far more often than α; confirming it
    on fresh windows holds the rate at α."""
    rates = simulate_false_ships(
        [0.2 * 1.000001] * 200,
        budget=0.2,
        confidence=0.95,
        rule="non_inferiority",
        search_windows=8,
        confirm_windows=8,
        spread=0.3,
        max_candidates=6,
        runs=2000,
    )
    assert rates.confirmed <= 0.05 + 3 * math.sqrt(0.05 * 0.95 / 2000)
    assert rates.unconfirmed > 2 * 0.05
    assert rates.confirmed < rates.unconfirmed


def test_a_front_well_within_the_budget_ships_nothing_false():
    rates = simulate_false_ships(
        [0.01] * 50,
        budget=0.2,
        confidence=0.95,
        rule="non_inferiority",
        search_windows=4,
        confirm_windows=4,
        spread=0.3,
        max_candidates=4,
        runs=200,
    )
    assert rates.confirmed == rates.unconfirmed == 0.0


def test_the_point_rule_passes_half_at_the_budgets_edge():
    rates = simulate_false_ships(
        [0.2 * 1.000001] * 100,
        budget=0.2,
        confidence=0.95,
        rule="point",
        search_windows=8,
        confirm_windows=8,
        spread=0.3,
        max_candidates=1,
        runs=4000,
    )
    # One probe, then one confirmation: each passes about half the time (lognormal noise is
    # skewed, so the median of the mean sits a little below its mean).
    assert 0.15 < rates.confirmed < 0.35
    assert 0.4 < rates.unconfirmed < 0.6


# --------------------------------------------------------------------------- allocation → stage


def test_an_allocation_becomes_one_stage_with_overrides_and_exclude():
    groups = [
        LayerGroup("l0.qkv", ("l0.q", "l0.k", "l0.v")),
        LayerGroup("l0.o", ("l0.o",)),
        LayerGroup("l1.qkv", ("l1.q", "l1.k", "l1.v")),
        LayerGroup("l1.o", ("l1.o",)),
        LayerGroup("lm_head", ("lm_head",), output=True),
    ]
    int4 = Format(4, 64, False)
    int8 = Format(8, PER_CHANNEL, True)
    template = QuantizeConfig(method="gptq", bits=4, group_size=32, observer="mse")
    decoder, head = allocation_stages(template, groups, [int4, int8, int4, KEEP_16, int8])
    # The template's own scheme stays (MoE experts, which the search does not choose for, take
    # it); every searched format other than it is an override naming its layers.
    assert (decoder.bits, decoder.group_size, decoder.symmetric) == (4, 32, True)
    assert decoder.method == "gptq" and decoder.observer == "mse"
    assert [(o.match, o.bits, o.group_size) for o in decoder.overrides] == [
        (["l0.q", "l0.k", "l0.v", "l1.q", "l1.k", "l1.v"], 4, 64),
        (["l0.o"], 8, -1),
    ]
    assert decoder.exclude == ["l1.o"]
    # GPTQ calibrates decoder layers only: the head is rounded to nearest in a stage of its own.
    assert (head.method, head.bits, head.include, head.observer) == ("rtn", 8, ["lm_head"], "mse")
    assert allocation_stages(template, groups, [int4, int8, int4, KEEP_16, KEEP_16])[1:] == []
    with pytest.raises(ValueError, match="quantizes nothing"):
        allocation_stages(template, groups[:1], [KEEP_16])


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("int4-g64-asym", Format(4, 64, False)),
        ("int8-channel-sym", Format(8, PER_CHANNEL, True)),
        ("keep", KEEP_16),
    ],
)
def test_format_names_round_trip(name, expected):
    assert Format.parse(name) == expected
    assert expected.name == name


@pytest.mark.parametrize("name", ["int3-g64-asym", "int4-g0-sym", "int4-g12-sym", "fp8", ""])
def test_bad_format_names_are_refused(name):
    with pytest.raises(ValueError):
        Format.parse(name)


def _recipe(**changes) -> dict:
    recipe = yaml.safe_load(
        """
version: 1
name: s
model: {source: some/model}
calibration: {path: calib.txt}
stages: [{type: quantize, method: gptq, bits: 4, group_size: 64, symmetric: false}]
eval:
  tasks: [{name: mmlu}]
  quality: {path: held.txt}
gate:
  budgets: {mmlu: {max_drop: 0.1}}
  quality: {max_kl_divergence: 0.2}
search: {}
"""
    )
    recipe.update(changes)
    return recipe


def test_a_search_recipe_parses_with_defaults():
    recipe = parse_recipe(_recipe(), "r.yaml")
    assert isinstance(recipe.search, SearchConfig)
    assert recipe.search.parsed_formats[-1] == KEEP_16


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        (
            {"stages": [{"type": "quantize", "bits": 8}, {"type": "quantize", "bits": 4}]},
            "stages",
        ),
        (
            {"stages": [{"type": "quantize", "bits": 4, "include": ["*.mlp.*"]}]},
            "stages[0].include",
        ),
        (
            {"stages": [{"type": "quantize", "bits": 4, "exclude": ["*.o_proj"]}]},
            "stages[0].exclude",
        ),
        ({"gate": {"budgets": {"mmlu": {"max_drop": 0.1}}}}, "gate.quality"),
        ({"search": {"formats": ["keep", "keep"]}}, "search.formats"),
        ({"search": {"formats": ["int4-g64"]}}, "search.formats"),
        ({"search": {"windows": 1}}, "search.windows"),
    ],
)
def test_search_settings_are_refused_by_field(changes, field):
    with pytest.raises(RecipeError, match=field.replace("[", r"\[").replace("]", r"\]")):
        parse_recipe(_recipe(**changes), "r.yaml")
