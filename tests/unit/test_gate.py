"""The gate: paired drops, task budgets, quality budgets, and how the report shows them."""

from __future__ import annotations

import math

import pytest

from compress.errors import BadInputError
from compress.evaluate.gate import decide, paired_drop
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


def _quality(perplexity: float, kl: float, agreement: float) -> QualityResult:
    return QualityResult(
        perplexity=perplexity,
        baseline_perplexity=20.0,
        kl_divergence=kl,
        top1_agreement=agreement,
        num_windows=1,
        num_tokens=10,
        per_window={
            "nll": [math.log(perplexity)],
            "kl": [kl],
            "agreement": [agreement],
            "tokens": [10],
            "baseline_nll": [math.log(20.0)],
        },
    )


BASE = _task({f"q{i}": float(i % 2) for i in range(10)})  # 5 of 10 right
SAME = _task(dict(BASE.items))
WORSE = _task({**BASE.items, "q1": 0.0})  # one right answer lost: drop 0.1


def test_paired_drop_mean_and_interval():
    paired = paired_drop(BASE.items, WORSE.items)
    assert paired.n == 10
    assert paired.drop == pytest.approx(0.1)
    assert paired.baseline_only == 1 and paired.artifact_only == 0
    assert paired.ci_low < 0.1 < paired.ci_high
    identical = paired_drop(BASE.items, SAME.items)
    assert identical.drop == identical.ci_low == identical.ci_high == 0.0


def test_paired_drop_refuses_different_items():
    with pytest.raises(BadInputError, match="different items"):
        paired_drop(BASE.items, {"other": 1.0})


def test_task_budget_decides():
    tight = GateConfig.model_validate({"budgets": {"mmlu": {"max_drop": 0.05}}})
    loose = GateConfig.model_validate({"budgets": {"mmlu": {"max_drop": 0.1}}})
    assert decide({"mmlu": BASE}, {"mmlu": WORSE}, tight).verdict == "reject"
    assert decide({"mmlu": BASE}, {"mmlu": WORSE}, loose).verdict == "ship"


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
    ],
)
def test_quality_budgets_decide(budget, verdict):
    gate = GateConfig.model_validate({"budgets": {"mmlu": {"max_drop": 0.5}}, "quality": budget})
    decision = decide({"mmlu": BASE}, {"mmlu": SAME}, gate, _quality(22.0, 0.15, 0.85))
    assert decision.verdict == verdict
    assert len(decision.quality) == len(budget)


def test_quality_budget_alone_gates_and_fails_without_measurement():
    gate = GateConfig.model_validate({"quality": {"max_kl_divergence": 0.1}})
    assert decide({"mmlu": BASE}, {"mmlu": WORSE}, gate, _quality(21, 0.05, 0.9)).verdict == "ship"
    with pytest.raises(BadInputError, match=r"gate\.quality"):
        decide({"mmlu": BASE}, {"mmlu": SAME}, gate, None)


def test_report_shows_quality_budgets():
    gate = GateConfig.model_validate(
        {"budgets": {"mmlu": {"max_drop": 0.05}}, "quality": {"max_kl_divergence": 0.1}}
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
    assert "| kl_divergence | 0.1500 | ≤ 0.1000 | NO |" in text
    assert report["verdict"] == "reject"
    assert "every quality budget met" in report["gate"]["rule"]
