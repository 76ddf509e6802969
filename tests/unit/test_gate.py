"""The gate: paired drops, task budgets, quality budgets, and how the report shows them."""

from __future__ import annotations

import math

import pytest

from compress.errors import BadInputError
from compress.evaluate.gate import decide
from compress.evaluate.lm_eval_runner import TaskResult
from compress.evaluate.quality import QualityResult
from compress.evaluate.report import build_report, render_markdown
from compress.recipe import GateConfig


def _task(items: dict[str, float], name: str = "mmlu") -> TaskResult:
    return TaskResult(
        task=name,
        metric="acc",
        value=sum(items.values()) / len(items),
        num_items=len(items),
        items=items,
    )


def _quality(perplexity: float, kl: float, agreement: float, windows: int = 4) -> QualityResult:
    """Windows whose values spread ±10 % around the given means (equal token counts)."""
    spread = [1 + 0.1 * (i - (windows - 1) / 2) / windows for i in range(windows)]
    return QualityResult(
        perplexity=perplexity,
        baseline_perplexity=20.0,
        kl_divergence=kl,
        top1_agreement=agreement,
        num_windows=windows,
        num_tokens=10 * windows,
        per_window={
            "nll": [math.log(perplexity) + 0.01 * (f - 1) for f in spread],
            "kl": [kl * f for f in spread],
            "agreement": [agreement * f for f in spread],
            "tokens": [10] * windows,
            "baseline_nll": [math.log(20.0)] * windows,
        },
    )


def _gate(**fields) -> GateConfig:
    return GateConfig.model_validate(fields)


BASE = _task({f"q{i}": float(i % 2) for i in range(10)})  # 5 of 10 right
SAME = _task(dict(BASE.items))
WORSE = _task({**BASE.items, "q1": 0.0})  # one right answer lost: drop 0.1
POINT = {"rule": "point"}


def test_paired_items_refuse_different_items():
    gate = _gate(budgets={"mmlu": {"max_drop": 0.1}})
    with pytest.raises(BadInputError, match="mmlu: baseline and artifact were scored on different"):
        decide({"mmlu": BASE}, {"mmlu": _task({"other": 1.0, "x": 0.0})}, gate)


def test_point_rule_decides_on_the_estimate():
    tight = _gate(**POINT, budgets={"mmlu": {"max_drop": 0.05}})
    loose = _gate(**POINT, budgets={"mmlu": {"max_drop": 0.1}})
    assert decide({"mmlu": BASE}, {"mmlu": WORSE}, tight).verdict == "reject"
    assert decide({"mmlu": BASE}, {"mmlu": WORSE}, loose).verdict == "ship"


def _many(right: int, lost: int, gained: int = 0, n: int = 2000) -> tuple[TaskResult, TaskResult]:
    """n items; the baseline gets `right`; the artifact loses `lost` of them, gains `gained`."""
    base = {f"q{i}": float(i < right) for i in range(n)}
    art = dict(base)
    for i in range(lost):
        art[f"q{i}"] = 0.0
    for i in range(right, right + gained):
        art[f"q{i}"] = 1.0
    return _task(base), _task(art)


@pytest.mark.parametrize(
    ("lost", "gained", "outcome"),
    [
        (60, 40, "ship"),  # drop 1 pt ± ~0.8: upper bound under the 3-point budget
        (160, 20, "reject"),  # drop 7 pts: confidently over budget
        (100, 40, "inconclusive"),  # drop 3 pts: on the budget, undecided
    ],
)
def test_non_inferiority_has_three_outcomes(lost, gained, outcome):
    base, art = _many(1000, lost, gained)
    decision = decide({"gsm8k": base}, {"gsm8k": art}, _gate(budgets={"gsm8k": {"max_drop": 0.03}}))
    assert decision.verdict == outcome
    task = decision.tasks[0]
    assert task.result.outcome == outcome
    low, high = task.result.interval
    assert low < task.estimate.center < high
    if outcome == "inconclusive":
        # The estimate sits on the budget: only an absurd sample size would decide.
        assert task.result.needed > 1_000_000
    base, art = _many(1000, 90, 40)  # drop 2.5 pts: undecided now, decidable with more items
    decision = decide({"gsm8k": base}, {"gsm8k": art}, _gate(budgets={"gsm8k": {"max_drop": 0.03}}))
    assert decision.verdict == "inconclusive"
    assert decision.tasks[0].result.needed > 2000


def test_the_point_rule_ships_what_non_inferiority_cannot_yet():
    assert (
        decide({"mmlu": BASE}, {"mmlu": SAME}, _gate(budgets={"mmlu": {"max_drop": 0.1}})).verdict
        == "inconclusive"
    )
    per_task = _gate(budgets={"mmlu": {"max_drop": 0.1, "rule": "point"}})
    assert decide({"mmlu": BASE}, {"mmlu": SAME}, per_task).verdict == "ship"


def test_holm_adjusts_the_reject_side_across_tasks():
    # Each task alone is just over budget at one-sided 5 %; two together are not, after Holm.
    base, art = _many(1000, 100, 20)
    alone = decide({"a": base}, {"a": art}, _gate(budgets={"a": {"max_drop": 0.03}}))
    p = alone.tasks[0].result.p_exceeds
    assert 0.025 < p < 0.05 and alone.verdict == "reject"
    both = decide(
        {"a": base, "b": base},
        {"a": art, "b": art},
        _gate(budgets={"a": {"max_drop": 0.03}, "b": {"max_drop": 0.03}}),
    )
    assert [t.result.p_exceeds_adjusted for t in both.tasks] == pytest.approx([2 * p, 2 * p])
    assert both.verdict == "inconclusive"


@pytest.mark.parametrize(
    ("budget", "verdict"),
    [
        ({"max_kl_divergence": 0.2}, "ship"),
        ({"max_kl_divergence": 0.1}, "reject"),
        ({"max_perplexity_increase": 0.15}, "ship"),  # 22 / 20 - 1 = 0.10
        ({"max_perplexity_increase": 0.05}, "reject"),
        ({"min_top1_agreement": 0.8}, "ship"),
        ({"min_top1_agreement": 0.9}, "reject"),
        ({"max_kl_divergence": 0.2, "min_top1_agreement": 0.9}, "reject"),  # every one counts
        ({"max_kl_divergence": 0.151}, "inconclusive"),  # KL 0.15 ± window spread
    ],
)
def test_quality_budgets_decide_with_intervals_over_windows(budget, verdict):
    gate = _gate(budgets={"mmlu": {"max_drop": 0.5, "rule": "point"}}, quality=budget)
    decision = decide({"mmlu": BASE}, {"mmlu": SAME}, gate, _quality(22.0, 0.15, 0.85))
    assert decision.verdict == verdict
    assert len(decision.quality) == len(budget)
    for q in decision.quality:
        low, high = q.interval
        assert low <= q.value <= high
        assert (q.bound >= q.value) if q.kind == "max" else (q.bound <= q.value)


def test_quality_point_rule_and_missing_measurement():
    gate = _gate(quality={"max_kl_divergence": 0.151, "rule": "point"})
    assert decide({"mmlu": BASE}, {"mmlu": WORSE}, gate, _quality(21, 0.15, 0.9)).verdict == "ship"
    with pytest.raises(BadInputError, match=r"gate\.quality"):
        decide({"mmlu": BASE}, {"mmlu": SAME}, gate, None)
    with pytest.raises(BadInputError, match="1 window"):
        decide(
            {"mmlu": BASE},
            {"mmlu": SAME},
            _gate(quality={"max_kl_divergence": 0.2}),
            _quality(21, 0.1, 0.9, windows=1),
        )


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"budgets": {"mmlu": {"max_drop": -0.1}}}, "max_drop"),
        ({"budgets": {"mmlu": {"max_drop": 0.1, "rule": "strict"}}}, "rule"),
        ({"confidence": 1.2, "budgets": {"mmlu": {"max_drop": 0.1}}}, "confidence"),
        ({}, "no budget"),
    ],
)
def test_bad_budgets_are_refused_naming_the_field(fields, message):
    with pytest.raises(ValueError, match=message):
        GateConfig.model_validate(fields)


def test_report_shows_intervals_bounds_and_outcomes():
    gate = _gate(
        budgets={"mmlu": {"max_drop": 0.05, "rule": "point"}}, quality={"max_kl_divergence": 0.1}
    )
    quality = _quality(22.0, 0.15, 0.85)
    decision = decide({"mmlu": BASE}, {"mmlu": SAME}, gate, quality)
    report = build_report(
        recipe_name="r",
        decision=decision,
        stages=[],
        sizes={"artifact_bytes": 1},
        timings={"total": 1.0},
        evaluation={},
        source={"display": "m", "sha256": "0" * 64},
        quality=quality.to_dict(),
    )
    text = render_markdown(report)
    kl = decision.quality[0]
    low, high = kl.interval
    row = f"| kl_divergence | 0.1500 | [{low:.4f}, {high:.4f}] | {kl.bound:.4f} | ≤ 0.1000 "
    assert row + "| non_inferiority | FAIL |" in text
    assert "| mmlu | acc | 10 | 50.0 | 50.0 | 0.0 |" in text
    assert report["verdict"] == "reject"
    (stored,) = report["gate"]["quality"]
    assert "upper" not in stored and "lower" not in stored  # check-scale numbers are nested
    assert stored["check"]["upper"] == stored["bound"] == kl.bound  # KL: the scales agree
    assert "kl_divergence on the mean KL(baseline ‖ artifact) per token, nats" in text
    assert "Holm over 1 non-inferiority check)" in report["gate"]["rule"]
