"""Every number the gate reports is on its own scale, from no change to collapse.

The gate decides each quality signal on a larger-is-worse check scale (the mean log perplexity
ratio, the top-1 disagreement); what it reports must be on the signal's scale, with the value
inside its interval and the bound on the conservative side, and drawing or rendering the
result must never fail. The decisions themselves are recomputed here from the windows (and
items) with the statistics alone, so a change of scale can never silently change a verdict.
"""

from __future__ import annotations

import json
import logging
import math
import random
from typing import Any

import pytest

from compress.evaluate import plots
from compress.evaluate.gate import GateDecision, decide
from compress.evaluate.html import render_report_html, render_sweep_html
from compress.evaluate.lm_eval_runner import TaskResult
from compress.evaluate.model_card import render_model_card
from compress.evaluate.quality import QualityResult
from compress.evaluate.release import Overrides, replay
from compress.evaluate.report import build_report, render_markdown
from compress.evaluate.stats import holm, paired_estimate, weighted_estimate
from compress.recipe import GateConfig

BASELINE_PPL = 27.7
SIGNALS = ("kl_divergence", "perplexity_increase", "top1_agreement")
LIMIT_FIELDS = {
    "kl_divergence": "max_kl_divergence",
    "perplexity_increase": "max_perplexity_increase",
    "top1_agreement": "min_top1_agreement",
}
# The check's scale, as the gate's docstring defines it (larger = worse).
TO_CHECK = {
    "kl_divergence": lambda x: x,
    "perplexity_increase": math.log1p,
    "top1_agreement": lambda x: 1 - x,
}
FROM_CHECK = {
    "kl_divergence": lambda x: x,
    "perplexity_increase": math.expm1,
    "top1_agreement": lambda x: 1 - x,
}
QUALITY_KEYS = {
    "signal",
    "value",
    "limit",
    "kind",
    "rule",
    "interval",
    "bound",
    "passed",
    "outcome",
    "p_within",
    "p_exceeds",
    "p_exceeds_adjusted",
    "needed",
    "windows",
    "check",
}

# (perplexity ratio, KL nats/token, top-1 agreement, window-to-window noise)
QUALITY_SWEEP = [
    (1.0, 0.0, 1.0, 0.0),  # no change: every window equals the baseline (a point interval)
    (1.0, 0.002, 0.995, 0.3),  # noise only; the perplexity may even go down
    (1.05, 0.05, 0.93, 0.3),
    (1.2, 0.2, 0.85, 0.3),
    (2.0, 1.0, 0.6, 0.3),
    (3.2, 2.5, 0.35, 0.3),  # once reported with the interval [1.36, 1.51] around 2.20
    (116.1 / BASELINE_PPL, 5.0, 0.05, 0.3),  # heavy pruning: 27.7 → 116.1, a legitimate reject
]
BUDGETS = ("loose", "near", "tight")
RULES = ("non_inferiority", "point")


# --------------------------------------------------------------------------- builders


def _centered(rng: random.Random, tokens: list[float], scale: float) -> list[float]:
    """Noise in ±2·scale whose token-weighted mean is exactly 0 (so aggregates hit targets)."""
    raw = [rng.uniform(-1, 1) for _ in tokens]
    mean = math.fsum(t * r for t, r in zip(tokens, raw, strict=True)) / math.fsum(tokens)
    return [scale * (r - mean) for r in raw]


def _pooled(values: list[float], tokens: list[float]) -> float:
    """The token-weighted mean, as quality.py pools it (sums over positions / positions)."""
    return math.fsum(v * t for v, t in zip(values, tokens, strict=True)) / math.fsum(tokens)


def _quality(
    ratio: float, kl: float, agreement: float, noise: float, seed: int = 0, windows: int = 12
) -> QualityResult:
    """Windows of unequal token counts whose token-weighted means are the given signals."""
    rng = random.Random(seed)
    tokens = [float(rng.randint(40, 600)) for _ in range(windows)]
    baseline_nll = [
        math.log(BASELINE_PPL) + e for e in _centered(rng, tokens, 0.2 if noise else 0.0)
    ]
    shift = math.log(ratio)
    nll = [
        b + shift + e
        for b, e in zip(baseline_nll, _centered(rng, tokens, noise * (0.05 + shift)), strict=True)
    ]
    kls = [kl + e for e in _centered(rng, tokens, noise * kl)]
    disagreement = 1 - agreement
    spread = noise * min(disagreement, agreement)
    agreements = [1 - (disagreement + e) for e in _centered(rng, tokens, spread)]
    return QualityResult(
        perplexity=math.exp(_pooled(nll, tokens)),
        baseline_perplexity=math.exp(_pooled(baseline_nll, tokens)),
        kl_divergence=_pooled(kls, tokens),
        top1_agreement=_pooled(agreements, tokens),
        num_windows=windows,
        num_tokens=int(sum(tokens)),
        per_window={
            "nll": nll,
            "kl": kls,
            "agreement": agreements,
            "tokens": tokens,
            "baseline_nll": baseline_nll,
        },
    )


def _aggregate(signal: str, quality: QualityResult) -> float:
    """The stored aggregate of a signal, on its own scale."""
    if signal == "kl_divergence":
        return quality.kl_divergence
    if signal == "perplexity_increase":
        return quality.perplexity / quality.baseline_perplexity - 1
    return quality.top1_agreement


def _limits(quality: QualityResult, which: str) -> dict[str, float]:
    """Limits on every signal, on its own scale: loose (passes), near (at the value), tight."""
    kl = quality.kl_divergence
    increase = _aggregate("perplexity_increase", quality)
    agreement = quality.top1_agreement
    if which == "loose":
        return {
            "kl_divergence": 2 * kl + 0.05,
            "perplexity_increase": 2 * max(increase, 0) + 0.05,
            "top1_agreement": agreement / 2,
        }
    if which == "near":
        return {
            "kl_divergence": max(kl, 1e-3),
            "perplexity_increase": max(increase, 0.0),
            "top1_agreement": agreement,
        }
    return {
        "kl_divergence": max(kl / 2, 1e-3),
        "perplexity_increase": max(increase / 2, 0.0),
        "top1_agreement": min(1.0, 1 - (1 - agreement) / 2),
    }


def _task(items: dict[str, float], name: str = "mmlu") -> TaskResult:
    return TaskResult(
        task=name,
        metric="acc",
        value=math.fsum(items.values()) / len(items),
        num_items=len(items),
        items=items,
    )


def _tasks(n: int, right: int, lost: int, gained: int) -> tuple[TaskResult, TaskResult]:
    """n 0/1 items; the baseline gets `right`; the artifact loses `lost`, gains `gained`."""
    base = {f"q{i:05d}": float(i < right) for i in range(n)}
    art = dict(base)
    for i in range(lost):
        art[f"q{i:05d}"] = 0.0
    for i in range(right, right + gained):
        art[f"q{i:05d}"] = 1.0
    return _task(base), _task(art)


SAME_BASE, SAME_ART = _tasks(10, 5, 0, 0)
POINT_TASK = {"mmlu": {"max_drop": 0.5, "rule": "point"}}  # not in Holm: quality decides alone


def _quality_gate(limits: dict[str, float], rule: str) -> GateConfig:
    quality = {LIMIT_FIELDS[s]: limit for s, limit in limits.items()} | {"rule": rule}
    return GateConfig.model_validate({"budgets": POINT_TASK, "quality": quality})


def _report(
    decision: GateDecision,
    gate: GateConfig,
    base: dict[str, TaskResult],
    art: dict[str, TaskResult],
    quality: QualityResult | None = None,
) -> dict[str, Any]:
    report = build_report(
        recipe_name="sweep",
        decision=decision,
        stages=[],
        sizes={"artifact_bytes": 123_000_000},
        timings={"total": 1.0},
        evaluation={
            "baseline": {k: v.to_dict() for k, v in base.items()},
            "artifact": {k: v.to_dict() for k, v in art.items()},
        },
        source={"display": "m", "sha256": "0" * 64},
        quality=None if quality is None else quality.to_dict(),
        gate_config=gate.model_dump(mode="json"),
    )
    return json.loads(json.dumps(report))  # what report.json holds and a replay reads


def _render(report: dict[str, Any], tmp_path, caplog) -> tuple[str, str]:
    """Markdown, HTML (with the gate figure) and the model card, with no plot warning."""
    with caplog.at_level(logging.WARNING, logger=plots.__name__):
        markdown = render_markdown(report)
        page = render_report_html(report, tmp_path)
        card = render_model_card(report, "name: sweep\n", None, None)
    assert "data:image/png;base64," in page  # the gate figure was drawn
    assert not [r for r in caplog.records if r.name == plots.__name__], caplog.text
    assert report["verdict"].upper() in card
    return markdown, page


# --------------------------------------------------------------------------- quality signals


def _reference_outcomes(
    quality: QualityResult, limits: dict[str, float], rule: str, confidence: float
) -> dict[str, str]:
    """Each signal's outcome decided on its check scale, from the windows."""
    windows = quality.per_window
    values = {
        "kl_divergence": windows["kl"],
        "perplexity_increase": [
            a - b for a, b in zip(windows["nll"], windows["baseline_nll"], strict=True)
        ],
        "top1_agreement": [1 - a for a in windows["agreement"]],
    }
    estimates = {s: weighted_estimate(values[s], windows["tokens"]) for s in limits}
    budgets = {s: TO_CHECK[s](limit) for s, limit in limits.items()}
    if rule == "point":
        return {s: "ship" if estimates[s].drop <= budgets[s] else "reject" for s in limits}
    alpha = 1 - confidence
    adjusted = holm([estimates[s].p_exceeds(budgets[s]) for s in limits])
    outcomes = {}
    for signal, p_adjusted in zip(limits, adjusted, strict=True):
        if estimates[signal].p_within(budgets[signal]) <= alpha:
            outcomes[signal] = "ship"
        elif p_adjusted <= alpha:
            outcomes[signal] = "reject"
        else:
            outcomes[signal] = "inconclusive"
    return outcomes


def _assert_on_signal_scale(q: dict[str, Any], quality: QualityResult, confidence: float) -> None:
    signal = q["signal"]
    assert set(q) == QUALITY_KEYS  # no check-scale "upper" / "lower" at the top level
    low, high = q["interval"]
    value, bound = q["value"], q["bound"]
    assert low <= value <= high, q
    if q["kind"] == "max":
        assert bound >= value, q
    else:
        assert bound <= value, q
    # The reported value is the stored aggregate (the same token-weighted mean) ...
    assert value == pytest.approx(_aggregate(signal, quality), rel=1e-9, abs=1e-12)
    # ... and the interval / bound are the check's, mapped back: signal scale, not check scale.
    check = q["check"]
    expected = sorted(FROM_CHECK[signal](x) for x in check["interval"])
    assert [low, high] == pytest.approx(expected, rel=1e-12, abs=1e-12)
    assert bound == pytest.approx(FROM_CHECK[signal](check["upper"]), rel=1e-12, abs=1e-12)
    assert value == pytest.approx(FROM_CHECK[signal](check["estimate"]), rel=1e-12, abs=1e-12)
    assert check["budget"] == pytest.approx(TO_CHECK[signal](q["limit"]), rel=1e-12, abs=1e-15)
    # Independently: the check's interval is the weighted estimate's, at the gate's confidence.
    windows = quality.per_window
    values = {
        "kl_divergence": windows["kl"],
        "perplexity_increase": [
            a - b for a, b in zip(windows["nll"], windows["baseline_nll"], strict=True)
        ],
        "top1_agreement": [1 - a for a in windows["agreement"]],
    }[signal]
    estimate = weighted_estimate(values, windows["tokens"])
    assert check["interval"] == pytest.approx(list(estimate.interval(confidence)), abs=1e-12)
    assert check["upper"] == pytest.approx(estimate.upper(confidence), abs=1e-12)
    assert check["lower"] == pytest.approx(estimate.lower(confidence), abs=1e-12)


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("budgets", BUDGETS)
@pytest.mark.parametrize(("ratio", "kl", "agreement", "noise"), QUALITY_SWEEP)
def test_quality_numbers_are_on_the_signal_scale(
    ratio, kl, agreement, noise, budgets, rule, tmp_path, caplog
):
    quality = _quality(ratio, kl, agreement, noise)
    assert quality.perplexity / quality.baseline_perplexity == pytest.approx(ratio, rel=1e-12)
    limits = _limits(quality, budgets)
    gate = _quality_gate(limits, rule)
    decision = decide({"mmlu": SAME_BASE}, {"mmlu": SAME_ART}, gate, quality)
    expected = _reference_outcomes(quality, limits, rule, gate.confidence)

    report = _report(decision, gate, {"mmlu": SAME_BASE}, {"mmlu": SAME_ART}, quality)
    checks = {q["signal"]: q for q in report["gate"]["quality"]}
    assert set(checks) == set(SIGNALS)
    for signal, q in checks.items():
        _assert_on_signal_scale(q, quality, gate.confidence)
        assert q["outcome"] == expected[signal], (signal, q)
        assert q["limit"] == limits[signal]
        if q["outcome"] == "ship" and rule == "non_inferiority":
            # Shipped with confidence: the conservative bound is within the limit.
            side = 1 if q["kind"] == "max" else -1
            assert side * (q["bound"] - q["limit"]) <= 1e-12, q
    outcomes = list(expected.values())
    verdict = (
        "reject"
        if "reject" in outcomes
        else "ship"
        if all(o == "ship" for o in outcomes)
        else "inconclusive"
    )
    assert report["verdict"] == verdict

    markdown, page = _render(report, tmp_path, caplog)
    for q in checks.values():
        low, high = q["interval"]
        row = f"| {q['signal']} | {q['value']:.4f} | [{low:.4f}, {high:.4f}] | {q['bound']:.4f} |"
        assert row in markdown
        assert f"[{low:.4f}, {high:.4f}]" in page
    assert "mean log perplexity ratio" in markdown and "1 − agreement" in markdown


def test_the_quality_sweep_reaches_every_outcome():
    """The sweep above is not vacuous: its cases ship, reject and stay undecided."""
    seen = set()
    for ratio, kl, agreement, noise in QUALITY_SWEEP:
        quality = _quality(ratio, kl, agreement, noise)
        for budgets in BUDGETS:
            gate = _quality_gate(_limits(quality, budgets), "non_inferiority")
            decision = decide({"mmlu": SAME_BASE}, {"mmlu": SAME_ART}, gate, quality)
            seen |= {q.result.outcome for q in decision.quality}
    assert seen == {"ship", "reject", "inconclusive"}


def test_a_perplexity_ratio_of_3_2_reports_an_interval_around_2_2():
    quality = _quality(3.2, 2.5, 0.35, 0.3)
    gate = _quality_gate({"perplexity_increase": 0.5}, "non_inferiority")
    (q,) = decide({"mmlu": SAME_BASE}, {"mmlu": SAME_ART}, gate, quality).to_dict()["quality"]
    low, high = q["interval"]
    assert q["value"] == pytest.approx(2.2, rel=1e-9)
    assert 1.6 < low < 2.2 < high < 3.0  # not the log ratio's [1.36, 1.51]
    assert q["check"]["estimate"] == pytest.approx(math.log(3.2), rel=1e-9)
    assert q["check"]["scale"].startswith("mean log perplexity ratio")


def test_a_top1_budget_reports_agreement_not_disagreement():
    quality = _quality(1.2, 0.2, 0.85, 0.3)
    gate = _quality_gate({"top1_agreement": 0.9}, "non_inferiority")
    (q,) = decide({"mmlu": SAME_BASE}, {"mmlu": SAME_ART}, gate, quality).to_dict()["quality"]
    low, high = q["interval"]
    assert 0.8 < low <= q["bound"] < q["value"] < high < 0.9
    assert q["value"] == pytest.approx(0.85, rel=1e-9)
    assert q["outcome"] == "reject" and q["check"]["upper"] > 0.1


# --------------------------------------------------------------------------- tasks

# (items, baseline right, lost by the artifact, gained): no change to total collapse, with few
# and many discordant pairs, and one artifact that is better than its baseline.
TASK_SWEEP = [
    (2, 2, 0, 0),
    (2, 2, 2, 0),
    (10, 5, 1, 0),
    (10, 10, 10, 0),
    (40, 10, 0, 20),
    (40, 30, 3, 1),
    (400, 300, 30, 10),
    (400, 400, 400, 0),
    (2000, 1800, 0, 0),
    (2000, 1500, 100, 95),
    (2000, 1000, 300, 0),
    (2000, 1000, 1000, 0),
]
CONFIDENCES = (0.95, 0.8, 0.6)


def _pct_cells(markdown: str, task: str) -> tuple[str, str, str]:
    """(drop cell, CI cell, upper-bound cell) of a task's row in the report's table."""
    row = next(line for line in markdown.splitlines() if line.startswith(f"| {task} | acc |"))
    cells = [c.strip() for c in row.split("|")]
    return cells[6], cells[7], cells[8]


def _task_outcome(estimate, budget: float, rule: str, confidence: float) -> str:
    if rule == "point":
        return "ship" if estimate.drop <= budget else "reject"
    alpha = 1 - confidence
    if estimate.p_within(budget) <= alpha:
        return "ship"
    return "reject" if estimate.p_exceeds(budget) <= alpha else "inconclusive"


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("confidence", CONFIDENCES)
@pytest.mark.parametrize(("n", "right", "lost", "gained"), TASK_SWEEP)
def test_task_numbers_are_consistent(n, right, lost, gained, confidence, rule, tmp_path, caplog):
    base, art = _tasks(n, right, lost, gained)
    gate = GateConfig.model_validate(
        {"confidence": confidence, "budgets": {"mmlu": {"max_drop": 0.05, "rule": rule}}}
    )
    decision = decide({"mmlu": base}, {"mmlu": art}, gate)
    report = _report(decision, gate, {"mmlu": base}, {"mmlu": art})
    (t,) = report["gate"]["tasks"]
    estimate = paired_estimate(list(base.items.values()), list(art.items.values()))
    low, high = t["interval"]
    assert t["drop"] == pytest.approx((lost - gained) / n, abs=1e-12)
    assert t["center"] == pytest.approx(estimate.center, abs=1e-15)
    assert low <= t["center"] <= high
    assert t["lower"] <= t["center"] <= t["upper"]
    assert [low, high] == pytest.approx(list(estimate.interval(confidence)), abs=1e-15)
    if confidence == 0.95:
        # At the default confidence the plain drop is inside too (checked over every 0/1
        # table up to 60 items); at lower ones the Agresti–Min pull can leave it outside.
        assert low <= t["drop"] <= high
    assert t["outcome"] == _task_outcome(estimate, 0.05, rule, confidence)
    assert report["verdict"] == t["outcome"]

    markdown, page = _render(report, tmp_path, caplog)
    drop_cell, ci_cell, upper_cell = _pct_cells(markdown, "mmlu")
    # What the table shows as the interval's estimate lies inside the interval it shows.
    shown = float(drop_cell.split("(adj. ")[-1].rstrip(")"))
    shown_low, shown_high = (float(x) for x in ci_cell.strip("[]").split(","))
    assert shown_low <= shown <= shown_high, (drop_cell, ci_cell)
    assert shown <= float(upper_cell)
    assert drop_cell.startswith(f"{100 * t['drop']:.1f}")
    if not low <= t["drop"] <= high:
        assert "(adj. " in drop_cell and "adj.: the drop the interval" in markdown
    assert drop_cell in page


def test_the_task_sweep_shows_adjusted_drops_where_the_plain_one_falls_outside():
    """The sweep covers the case that made `center` necessary (so the checks above can bite)."""
    outside = []
    for n, right, lost, gained in TASK_SWEEP:
        base, art = _tasks(n, right, lost, gained)
        gate = GateConfig.model_validate(
            {"confidence": 0.6, "budgets": {"mmlu": {"max_drop": 0.05}}}
        )
        (t,) = decide({"mmlu": base}, {"mmlu": art}, gate).to_dict()["tasks"]
        low, high = t["interval"]
        if not low <= t["drop"] <= high:
            outside.append((n, lost))
    assert (2, 2) in outside and (10, 10) in outside


def test_a_heavily_pruned_artifact_is_rejected_and_drawn(tmp_path, caplog):
    """27.7 → 116.1 perplexity and a collapsed task: a verdict, a report and a figure."""
    quality = _quality(116.1 / BASELINE_PPL, 5.0, 0.05, 0.3)
    base, art = _tasks(400, 300, 250, 5)
    gate = GateConfig.model_validate(
        {
            "budgets": {"mmlu": {"max_drop": 0.05}},
            "quality": {"max_perplexity_increase": 0.1, "min_top1_agreement": 0.8},
        }
    )
    decision = decide({"mmlu": base}, {"mmlu": art}, gate, quality)
    assert decision.verdict == "reject"
    report = _report(decision, gate, {"mmlu": base}, {"mmlu": art}, quality)
    assert plots.gate_figure(report["gate"]).startswith(b"\x89PNG")
    markdown, _ = _render(report, tmp_path, caplog)
    (ppl,) = (q for q in report["gate"]["quality"] if q["signal"] == "perplexity_increase")
    assert ppl["value"] == pytest.approx(116.1 / 27.7 - 1, rel=1e-9)
    assert f"| perplexity_increase | {ppl['value']:.4f} |" in markdown


def test_a_replayed_report_re_decides_to_the_same_numbers():
    quality = _quality(1.2, 0.2, 0.85, 0.3)
    base, art = _tasks(400, 300, 30, 10)
    gate = GateConfig.model_validate(
        {
            "budgets": {"mmlu": {"max_drop": 0.05}},
            "quality": {"max_perplexity_increase": 0.3, "min_top1_agreement": 0.8},
        }
    )
    decision = decide({"mmlu": base}, {"mmlu": art}, gate, quality)
    report = _report(decision, gate, {"mmlu": base}, {"mmlu": art}, quality)
    replayed = json.loads(json.dumps(replay(report, Overrides(budgets={})).to_dict()))
    assert replayed == report["gate"]


# --------------------------------------------------------------------------- failing plots


def _small_report() -> dict[str, Any]:
    quality = _quality(1.2, 0.2, 0.85, 0.3)
    gate = _quality_gate({"perplexity_increase": 0.3, "kl_divergence": 0.3}, "non_inferiority")
    decision = decide({"mmlu": SAME_BASE}, {"mmlu": SAME_ART}, gate, quality)
    return _report(decision, gate, {"mmlu": SAME_BASE}, {"mmlu": SAME_ART}, quality)


@pytest.mark.parametrize("broken", ["_gate_figure", "_png", "_pyplot"])
def test_a_failing_gate_figure_changes_nothing(broken, monkeypatch, tmp_path, caplog):
    import matplotlib.pyplot as plt

    report = _small_report()
    markdown_before = render_markdown(report)

    def fail(*_args, **_kwargs):
        raise RuntimeError("no display today")

    monkeypatch.setattr(plots, broken, fail)
    open_before = plt.get_fignums()
    with caplog.at_level(logging.WARNING, logger=plots.__name__):
        assert plots.gate_figure(report["gate"]) is None
        page = render_report_html(report, tmp_path)
        markdown = render_markdown(report)
    assert "gate figure not drawn: RuntimeError: no display today" in caplog.text
    assert plt.get_fignums() == open_before  # the half-drawn figure was closed
    assert "data:image/png" not in page and "gate checks: no plot" in page
    assert '<span class="badge ship">SHIP</span>' in page
    assert markdown == markdown_before


def test_a_failing_sweep_figure_and_loss_curve_change_nothing(monkeypatch, tmp_path, caplog):
    report = _small_report()

    def fail(*_args, **_kwargs):
        raise RuntimeError("disk full")

    stages = [
        {
            "index": 0,
            "type": "distill",
            "details": {"curve": [{"step": s, "loss": 1 / (s + 1), "kd": 0.5} for s in range(5)]},
        }
    ]
    assert plots.write_loss_curves(stages, tmp_path) == [plots.loss_curve_name(0)]  # control
    (tmp_path / plots.loss_curve_name(0)).unlink()
    monkeypatch.setattr(plots, "_sweep_figure", fail)
    monkeypatch.setattr(plots, "_draw_loss_curve", fail)
    with caplog.at_level(logging.WARNING, logger=plots.__name__):
        page = render_sweep_html([report, report])
        names = plots.write_loss_curves(stages, tmp_path)
    assert "sweep figure not drawn" in caplog.text and "loss curve of stage 0" in caplog.text
    assert "size vs accuracy: no plot" in page and "sweep" in page
    assert names == [] and list(tmp_path.iterdir()) == []  # no file, no leftover temporary
    assert plots.write_loss_curves([{"type": "distill"}], tmp_path) == []  # malformed: no raise


def test_error_bars_are_never_negative_even_for_an_inconsistent_stored_report(caplog):
    """The crash of a reject run: a value outside its (wrong-scale) interval. A report written
    before the fix still draws, with the bar clamped."""
    assert plots.error_bar(2.2, 1.36, 1.51) == [[pytest.approx(0.84)], [0.0]]
    assert plots.error_bar(1.0, 1.2, 1.5) == [[0.0], [0.5]]
    old = {
        "confidence": 0.95,
        "tasks": [
            {
                "task": "mmlu",
                "metric": "acc",
                "baseline": 1.0,
                "artifact": 0.0,
                "drop": 1.0,
                "interval": [0.2, 0.9],  # the plain drop outside the interval
                "max_drop": 0.05,
                "outcome": "reject",
                "estimate": {"n": 10, "center": 0.83},
            }
        ],
        "quality": [
            {
                "signal": "perplexity_increase",
                "value": 2.2,
                "interval": [1.36, 1.51],
                "limit": 0.1,
                "outcome": "reject",
            }
        ],
    }
    with caplog.at_level(logging.WARNING, logger=plots.__name__):
        png = plots.gate_figure(old)
    assert png is not None and png.startswith(b"\x89PNG"), caplog.text
