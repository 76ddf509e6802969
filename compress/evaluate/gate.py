"""The release gate: does the artifact stay within its budgets, and how sure are we?

Each gated quantity is a *check*: an estimate on a scale where larger is worse (the paired
accuracy drop, the KL divergence, the log perplexity ratio, the top-1 disagreement) against
its budget on that scale. Per check, the rule is

- `non_inferiority` (default): ship when the one-sided upper confidence bound is within the
  budget; reject when the lower bound is above it (Holm-adjusted across the gated checks);
  otherwise inconclusive, with the number of items that would likely decide it;
- `point`: the estimate alone decides, ship or reject.

The verdict: reject if any check rejects; ship if every check ships; otherwise inconclusive
(not shipped). The statistics are in `compress.evaluate.stats`; this module only applies them,
so a stored report re-decides identically (`compress gate --replay`).
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from compress.errors import BadInputError
from compress.evaluate.lm_eval_runner import TaskResult
from compress.evaluate.quality import QualityResult
from compress.evaluate.stats import (
    PairedEstimate,
    holm,
    items_needed,
    look_bounds,
    look_outcome,
    look_sizes,
    paired_estimate,
    weighted_estimate,
)
from compress.recipe import GateConfig, Rule, SequentialConfig

Outcome = Literal["ship", "reject", "inconclusive"]


@dataclass(frozen=True)
class Check:
    """One gated (or only reported) quantity, larger = worse, against its budget."""

    name: str
    estimate: PairedEstimate
    budget: float | None  # None: reported, not gated
    rule: Rule

    @property
    def gated_by_confidence(self) -> bool:
        return self.budget is not None and self.rule == "non_inferiority"


@dataclass(frozen=True)
class CheckResult:
    """What the gate concluded about one check (numbers on the check's own scale)."""

    outcome: Outcome | Literal["reported", "continue"]
    upper: float  # one-sided upper bound at the gate's confidence
    lower: float
    interval: tuple[float, float]  # two-sided, at the gate's confidence
    p_within: float | None  # H0: at or over budget
    p_exceeds: float | None  # H0: within budget (Holm-adjusted below)
    p_exceeds_adjusted: float | None
    needed: int | None  # items (windows) likely to decide an inconclusive check

    def to_dict(self) -> dict[str, Any]:
        return {
            "outcome": self.outcome,
            "upper": self.upper,
            "lower": self.lower,
            "interval": list(self.interval),
            "p_within": self.p_within,
            "p_exceeds": self.p_exceeds,
            "p_exceeds_adjusted": self.p_exceeds_adjusted,
            "needed": self.needed,
        }


def judge(
    checks: list[Check], gate: GateConfig, sequential: dict[str, str] | None = None
) -> list[CheckResult]:
    """Every check's outcome; Holm adjusts the reject side over the confidence-gated checks.

    `sequential`: check name → its outcome from the group-sequential test (which replaces
    the fixed-sample one; "continue" while looks remain)."""
    sequential = sequential or {}
    alpha, confidence = gate.alpha, gate.confidence
    ni = [c for c in checks if c.gated_by_confidence]
    adjusted = dict(
        zip(
            (c.name for c in ni),
            holm([c.estimate.p_exceeds(c.budget) for c in ni]),  # type: ignore[arg-type]
            strict=True,
        )
    )
    results = []
    for check in checks:
        est, budget = check.estimate, check.budget
        p_within = p_exceeds = p_adjusted = None
        needed = None
        if budget is None:
            outcome = "reported"
        elif sequential.get(check.name) == "continue":
            outcome = "continue"  # looks remain: no verdict yet, whatever the rule
        elif check.rule == "point":
            outcome = "ship" if est.drop <= budget else "reject"
        else:
            p_within, p_exceeds = est.p_within(budget), est.p_exceeds(budget)
            p_adjusted = adjusted[check.name]
            if check.name in sequential:
                outcome = sequential[check.name]
                if outcome == "inconclusive":
                    needed = items_needed(est.sd, budget - est.center, alpha, gate.power)
            elif p_within <= alpha:
                outcome = "ship"
            elif p_adjusted <= alpha:
                outcome = "reject"
            else:
                outcome = "inconclusive"
                needed = items_needed(est.sd, budget - est.center, alpha, gate.power)
        results.append(
            CheckResult(
                outcome=outcome,
                upper=est.upper(confidence),
                lower=est.lower(confidence),
                interval=est.interval(confidence),
                p_within=p_within,
                p_exceeds=p_exceeds,
                p_exceeds_adjusted=p_adjusted,
                needed=needed,
            )
        )
    return results


def overall(outcomes: list[str]) -> Outcome | Literal["continue"]:
    """reject if any check rejects; else continue while a sequential check has looks left;
    ship if every gated check ships; else inconclusive."""
    gated = [o for o in outcomes if o != "reported"]
    if "reject" in gated:
        return "reject"
    if "continue" in gated:
        return "continue"
    if all(o == "ship" for o in gated):
        return "ship"
    return "inconclusive"


# --------------------------------------------------------------------------- tasks


def paired_items(
    task: str, baseline: dict[str, float], artifact: dict[str, float]
) -> tuple[list[float], list[float]]:
    """The two models' scores on the same item ids, in sorted id order."""
    if set(baseline) != set(artifact):
        only_base = sorted(set(baseline) - set(artifact))[:3]
        only_art = sorted(set(artifact) - set(baseline))[:3]
        raise BadInputError(
            f"{task}: baseline and artifact were scored on different items (baseline only: "
            f"{only_base}, artifact only: {only_art}); rerun both with the same limits and seed"
        )
    if len(baseline) < 2:
        raise BadInputError(f"{task}: {len(baseline)} scored item(s); the gate needs at least 2")
    ids = sorted(baseline)
    return [baseline[i] for i in ids], [artifact[i] for i in ids]


# What must be equal in two runs for their items to be compared: the backend and its version,
# the task versions and data, the prompt (few-shot count and seed), the item selection and the
# generation cap. dtype and device may differ: they are the models' own.
COMPARED_RUN_INFO = (
    "lm_eval_version",
    "task_versions",
    "num_fewshot",
    "seed",
    "limit",
    "max_gen_toks",
    "batch_size",
    "data_source",
    "prompt_digests",  # the same questions, with the same few-shot context, batch by batch
)


def check_comparable(name: str, base: TaskResult, art: TaskResult) -> None:
    """Refuse to compare runs made under different evaluation settings (naming them)."""
    if base.metric != art.metric:
        raise BadInputError(f"{name}: baseline metric {base.metric} != artifact {art.metric}")
    differing = [
        f"{key} {base.info.get(key)!r} vs {art.info.get(key)!r}"
        for key in COMPARED_RUN_INFO
        if base.info.get(key) != art.info.get(key)
    ]
    if differing:
        raise BadInputError(
            f"{name}: the baseline and the artifact were evaluated differently "
            f"({'; '.join(differing)}); score both under the same settings"
        )


def gated_tasks(gate: GateConfig, scored: dict[str, TaskResult]) -> list[str]:
    return [name for name in scored if name in gate.budgets]


def task_check(name: str, base: TaskResult, art: TaskResult, gate: GateConfig) -> Check:
    check_comparable(name, base, art)
    budget = gate.budgets.get(name)
    estimate = paired_estimate(*paired_items(name, base.items, art.items))
    return Check(
        name=name,
        estimate=estimate,
        budget=None if budget is None else budget.max_drop,
        rule=gate.rule if budget is None else gate.rule_of(budget),
    )


# --------------------------------------------------------------------------- quality signals

QualitySignal = Literal["kl_divergence", "perplexity_increase", "top1_agreement"]


@dataclass(frozen=True)
class QualityScale:
    """How a signal maps to its check's larger-is-worse scale and back."""

    signal: QualitySignal
    kind: Literal["max", "min"]

    def to_check(self, limit: float) -> float:
        if self.signal == "perplexity_increase":
            return math.log1p(limit)  # the check is on the mean log perplexity ratio
        if self.signal == "top1_agreement":
            return 1 - limit  # the check is on disagreement
        return limit

    def from_check(self, value: float) -> float:
        if self.signal == "perplexity_increase":
            return math.expm1(value)
        if self.signal == "top1_agreement":
            return 1 - value
        return value

    @property
    def description(self) -> str:
        """The check's scale in words (reported beside its numbers)."""
        return {
            "kl_divergence": "mean KL(baseline ‖ artifact) per token, nats",
            "perplexity_increase": "mean log perplexity ratio, log(artifact / baseline)",
            "top1_agreement": "top-1 disagreement, 1 − agreement",
        }[self.signal]


def quality_estimate(signal: QualitySignal, quality: QualityResult) -> PairedEstimate:
    """Token-weighted over windows, on the check's scale."""
    windows = quality.per_window
    tokens = windows["tokens"]
    if signal == "kl_divergence":
        values = windows["kl"]
    elif signal == "perplexity_increase":
        values = [a - b for a, b in zip(windows["nll"], windows["baseline_nll"], strict=True)]
    else:
        values = [1 - a for a in windows["agreement"]]
    if len(values) < 2:
        raise BadInputError(
            f"gate.quality: {len(values)} window(s) of held-out text; intervals need at least "
            "2 (raise eval.quality.max_windows or give a longer text)"
        )
    return weighted_estimate(values, tokens)


@dataclass(frozen=True)
class QualityVerdict:
    """One held-out-text signal against its limit.

    `value`, `limit`, `interval` and `bound` are in the signal's own units (what a reader
    compares); `estimate`, `budget` and `result` are the check's, on its larger-is-worse scale
    (`QualityScale`), and are what decided."""

    signal: QualitySignal
    value: float
    limit: float
    kind: Literal["max", "min"]
    rule: Rule
    interval: tuple[float, float]  # two-sided, sorted low ≤ high
    bound: float  # the conservative one-sided bound (upper for max, lower for min)
    result: CheckResult
    estimate: PairedEstimate  # on the check's scale
    budget: float  # the limit on the check's scale
    scale: str  # the check's scale, in words

    @property
    def passed(self) -> bool:
        return self.result.outcome == "ship"

    def to_dict(self) -> dict[str, Any]:
        # Top-level numbers are on the signal's scale only; the check's numbers (log ratio,
        # disagreement) go under "check", so no key can be read on the wrong scale.
        result = self.result
        return {
            "signal": self.signal,
            "value": self.value,
            "limit": self.limit,
            "kind": self.kind,
            "rule": self.rule,
            "interval": list(self.interval),
            "bound": self.bound,
            "passed": self.passed,
            "outcome": result.outcome,
            "p_within": result.p_within,
            "p_exceeds": result.p_exceeds,
            "p_exceeds_adjusted": result.p_exceeds_adjusted,
            "needed": result.needed,
            "windows": self.estimate.n,
            "check": {
                "scale": self.scale,
                "estimate": self.estimate.center,
                "interval": list(result.interval),
                "upper": result.upper,
                "lower": result.lower,
                "budget": self.budget,
            },
        }


QualityCheck = tuple[QualityScale, float, Check]  # (scale, limit on the signal's scale, check)


def quality_checks(gate: GateConfig, quality: QualityResult) -> list[QualityCheck]:
    budget = gate.quality
    assert budget is not None
    limits: list[tuple[QualitySignal, Literal["max", "min"], float | None]] = [
        ("kl_divergence", "max", budget.max_kl_divergence),
        ("perplexity_increase", "max", budget.max_perplexity_increase),
        ("top1_agreement", "min", budget.min_top1_agreement),
    ]
    checks: list[QualityCheck] = []
    for signal, kind, limit in limits:
        if limit is None:
            continue
        scale = QualityScale(signal, kind)
        estimate = quality_estimate(signal, quality)
        check = Check(signal, estimate, scale.to_check(limit), gate.rule_of(budget))
        checks.append((scale, limit, check))
    return checks


def quality_verdict(
    scale: QualityScale, limit: float, check: Check, result: CheckResult
) -> QualityVerdict:
    """The check's numbers mapped back to the signal's scale (monotone maps, so the interval
    still holds the value and the bound stays on the conservative side).

    The value is the check's own estimate mapped back, not the stored aggregate
    (`quality.kl_divergence`, `perplexity / baseline_perplexity − 1`, `top1_agreement`). In
    exact arithmetic they are the same token-weighted mean: quality.py pools sums over every
    scored position, `weighted_estimate` weights per-window means by their token counts, and the
    baseline perplexity comes from the same windows as "baseline_nll". But they are computed
    differently (last-bit differences, which matter when the windows agree and the interval is
    a point) and a stored report may hold aggregates that no longer match its windows; only
    the estimate the interval is built around is certain to lie inside it."""
    assert check.budget is not None
    # Larger is worse on the check's scale, so its upper bound is the conservative one on
    # either kind of signal: the upper KL / ratio, or the lower agreement.
    low, high = sorted(scale.from_check(x) for x in result.interval)
    return QualityVerdict(
        signal=scale.signal,
        value=scale.from_check(check.estimate.center),
        limit=limit,
        kind=scale.kind,
        rule=check.rule,
        interval=(low, high),
        bound=scale.from_check(result.upper),
        result=result,
        estimate=check.estimate,
        budget=check.budget,
        scale=scale.description,
    )


# --------------------------------------------------------------------------- sequential


def look_plan(universe: list[str], config: SequentialConfig) -> tuple[list[str], list[int]]:
    """(item ids in scoring order, items scored by each look): a seeded shuffle of the task's
    items, so every look is a random sample of the whole task (every subject of MMLU)."""
    order = sorted(universe)
    random.Random(config.seed).shuffle(order)
    return order, look_sizes(len(order), config.looks, config.first)


def batch_of_look(plan: tuple[list[str], list[int]], look: int) -> list[str]:
    """The items look `look` (0-based) adds."""
    order, sizes = plan
    return order[(sizes[look - 1] if look else 0) : sizes[look]]


@dataclass(frozen=True)
class SequentialState:
    """One task of a sequential gate: where it stands after the looks scored so far."""

    outcome: str  # ship | reject | inconclusive | continue
    look: int  # looks scored (1-based count)
    looks: int
    items_used: int
    items_planned: int
    bounds: list[dict[str, float]]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def sequential_state(
    name: str,
    base: TaskResult,
    art: TaskResult,
    gate: GateConfig,
    reject_alpha: float,
    decided_by_looks: bool,
) -> tuple[SequentialState, TaskResult]:
    """Replay the looks the artifact's items cover; returns the state and the baseline
    restricted to the artifact's items (what the estimate pairs with)."""
    assert gate.sequential is not None
    plan = look_plan(list(base.items), gate.sequential)
    order, sizes = plan
    scored = len(art.items)
    if scored not in sizes or set(order[:scored]) != set(art.items):
        raise BadInputError(
            f"{name}: the artifact's {scored} items are not a prefix of the sequential plan "
            f"(looks after {sizes} of the baseline's items, seed {gate.sequential.seed})"
        )
    looks_done = sizes.index(scored) + 1
    bounds = look_bounds(sizes, gate.alpha, reject_alpha)
    outcome = "continue" if looks_done < len(sizes) else "inconclusive"
    stopped = looks_done
    if decided_by_looks:
        for look in range(looks_done):
            ids = order[: sizes[look]]
            estimate = paired_estimate([base.items[i] for i in ids], [art.items[i] for i in ids])
            decided = look_outcome(estimate, gate.budgets[name].max_drop, bounds[look])
            if decided is not None:
                outcome, stopped = decided, look + 1
                break
    elif looks_done == len(sizes):
        outcome = "final"  # a point-rule or reported task: judged on all its items
    state = SequentialState(
        outcome=outcome,
        look=stopped,
        looks=len(sizes),
        items_used=scored,
        items_planned=sizes[-1],
        bounds=[{"ship": b.ship, "reject": b.reject} for b in bounds],
    )
    return state, base.restricted_to(order[:scored], looks_done)


# --------------------------------------------------------------------------- the decision


@dataclass(frozen=True)
class TaskVerdict:
    task: str
    metric: str
    baseline: float
    artifact: float
    max_drop: float | None  # None: reported, not gated
    rule: Rule
    estimate: PairedEstimate
    result: CheckResult

    @property
    def drop(self) -> float:
        return self.baseline - self.artifact

    @property
    def passed(self) -> bool:
        return self.result.outcome in ("ship", "reported")

    def to_dict(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "metric": self.metric,
            "baseline": self.baseline,
            "artifact": self.artifact,
            "drop": self.drop,
            # The drop the interval and bounds are built around: for 0/1 items the Agresti–Min
            # estimate, pulled toward 0 by the pseudo-counts, so `drop` itself can fall outside
            # a low-confidence interval on a collapsed task; for graded items it is `drop`.
            "center": self.estimate.center,
            "max_drop": self.max_drop,
            "rule": self.rule,
            "passed": self.passed,
            "estimate": self.estimate.to_dict(),
            **self.result.to_dict(),
        }


@dataclass(frozen=True)
class GateDecision:
    verdict: Outcome | Literal["continue"]  # continue: a sequential gate has looks left
    confidence: float
    tasks: list[TaskVerdict]
    quality: list[QualityVerdict] = field(default_factory=list)
    sequential: dict[str, Any] | None = None  # looks, items used, per look (when sequential)

    def to_dict(self) -> dict[str, Any]:
        gated = sum(t.max_drop is not None and t.rule == "non_inferiority" for t in self.tasks)
        gated += sum(q.rule == "non_inferiority" for q in self.quality)
        return {
            "verdict": self.verdict,
            "confidence": self.confidence,
            "rule": (
                f"per check: non_inferiority (one-sided {self.confidence:.0%} bounds) or point; "
                "ship when every gated check ships (intersection-union: no adjustment needed), "
                "reject when any check is confidently over budget "
                f"({'Bonferroni, sequential looks' if self.sequential else 'Holm'} over {gated} "
                f"non-inferiority check{'' if gated == 1 else 's'})"
            ),
            "tasks": [t.to_dict() for t in self.tasks],
            "quality": [q.to_dict() for q in self.quality],
            "sequential": self.sequential,
        }


def decide(
    baseline: dict[str, TaskResult],
    artifact: dict[str, TaskResult],
    gate: GateConfig,
    quality: QualityResult | None = None,
    sequential: dict[str, Any] | None = None,
) -> GateDecision:
    """Judge every task and quality budget together; see the module docstring."""
    if gate.quality is not None and quality is None:
        raise BadInputError("gate.quality is set but no quality measurement was made")
    missing = sorted(set(baseline) - set(artifact))
    if missing:
        raise BadInputError(f"the artifact was not scored on {missing}")
    baseline, states = _sequential_view(baseline, artifact, gate, quality)
    task_checks = [task_check(name, base, artifact[name], gate) for name, base in baseline.items()]
    scaled = [] if gate.quality is None or quality is None else quality_checks(gate, quality)
    overrides = {n: s.outcome for n, s in states.items() if s.outcome != "final"}
    results = judge(task_checks + [check for _, _, check in scaled], gate, overrides)
    task_results, quality_results = results[: len(task_checks)], results[len(task_checks) :]
    tasks = [
        TaskVerdict(
            task=check.name,
            metric=baseline[check.name].metric,
            baseline=baseline[check.name].value,
            artifact=artifact[check.name].value,
            max_drop=check.budget,
            rule=check.rule,
            estimate=check.estimate,
            result=result,
        )
        for check, result in zip(task_checks, task_results, strict=True)
    ]
    qualities = [
        quality_verdict(scale, limit, check, result)
        for (scale, limit, check), result in zip(scaled, quality_results, strict=True)
    ]
    verdict = overall([r.outcome for r in results])
    record = None
    if states:
        record = {
            "looks": max(s.looks for s in states.values()),
            "look": max(s.look for s in states.values()),
            "items_used": sum(s.items_used for s in states.values()),
            "items_planned": sum(s.items_planned for s in states.values()),
            "tasks": {n: s.to_dict() for n, s in states.items()},
        }
    return GateDecision(verdict, gate.confidence, tasks, qualities, record)


def _sequential_view(
    baseline: dict[str, TaskResult],
    artifact: dict[str, TaskResult],
    gate: GateConfig,
    quality: QualityResult | None,
) -> tuple[dict[str, TaskResult], dict[str, SequentialState]]:
    """Under `gate.sequential`: each task's looks replayed, and the baseline cut to the
    artifact's items. The reject side is split (Bonferroni) over the confidence-gated checks,
    whose number is known before any look."""
    if gate.sequential is None:
        return baseline, {}
    gated = [
        n
        for n in baseline
        if n in gate.budgets and gate.rule_of(gate.budgets[n]) == "non_inferiority"
    ]
    quality_count = (
        0 if gate.quality is None or quality is None else len(quality_checks(gate, quality))
    )
    reject_alpha = gate.alpha / max(1, len(gated) + quality_count)
    restricted, states = {}, {}
    for name, base in baseline.items():
        state, restricted[name] = sequential_state(
            name, base, artifact[name], gate, reject_alpha, name in gated
        )
        states[name] = state
    return restricted, states
