"""The release gate: per-task budgets on the paired baseline-vs-artifact comparison.

The verdict rule here is the budget on the point estimate of the drop (`max_drop`); every
decision also carries the paired 95% confidence interval of the drop, computed on the items
both models answered, so a reader sees how much of the drop is noise.

Optional quality budgets (`gate.quality`) limit the held-out-text signals: KL divergence to
the baseline, relative perplexity increase, top-1 agreement. They move long before benchmark
accuracy does, so they catch a damaged artifact that a few hundred items cannot.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Literal

from compress.errors import BadInputError
from compress.evaluate.lm_eval_runner import TaskResult
from compress.evaluate.quality import QualityResult
from compress.recipe import GateConfig, QualityBudget

Z_95 = 1.959963984540054


@dataclass(frozen=True)
class PairedDrop:
    """Baseline minus artifact on the same items (positive = the artifact is worse)."""

    n: int
    drop: float
    ci_low: float
    ci_high: float
    baseline_only: int  # items only the baseline got right (discordant pairs drive the CI)
    artifact_only: int


@dataclass(frozen=True)
class TaskVerdict:
    task: str
    metric: str
    baseline: float
    artifact: float
    max_drop: float | None  # None: reported, not gated
    paired: PairedDrop
    passed: bool

    @property
    def drop(self) -> float:
        return self.baseline - self.artifact


@dataclass(frozen=True)
class QualityVerdict:
    """One held-out-text signal against its limit (`kind` says which side is bad)."""

    signal: Literal["kl_divergence", "perplexity_increase", "top1_agreement"]
    value: float
    limit: float
    kind: Literal["max", "min"]

    @property
    def passed(self) -> bool:
        return self.value <= self.limit if self.kind == "max" else self.value >= self.limit


@dataclass(frozen=True)
class GateDecision:
    verdict: Literal["ship", "reject"]
    tasks: list[TaskVerdict]
    quality: list[QualityVerdict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "verdict": self.verdict,
            "rule": "point estimate of the drop within max_drop, every gated task"
            + ("; every quality budget met" if self.quality else ""),
            "tasks": [{**asdict(t), "drop": t.drop} for t in self.tasks],
            "quality": [{**asdict(q), "passed": q.passed} for q in self.quality],
        }


def quality_verdicts(budget: QualityBudget, quality: QualityResult) -> list[QualityVerdict]:
    """The configured quality limits, each checked against the measurement."""
    verdicts = []
    if budget.max_kl_divergence is not None:
        verdicts.append(
            QualityVerdict("kl_divergence", quality.kl_divergence, budget.max_kl_divergence, "max")
        )
    if budget.max_perplexity_increase is not None:
        increase = quality.perplexity / quality.baseline_perplexity - 1
        verdicts.append(
            QualityVerdict("perplexity_increase", increase, budget.max_perplexity_increase, "max")
        )
    if budget.min_top1_agreement is not None:
        agreement = quality.top1_agreement
        verdicts.append(
            QualityVerdict("top1_agreement", agreement, budget.min_top1_agreement, "min")
        )
    return verdicts


def paired_drop(baseline: dict[str, float], artifact: dict[str, float]) -> PairedDrop:
    """Mean per-item difference with a normal-approximation 95% interval."""
    if set(baseline) != set(artifact):
        only_base = sorted(set(baseline) - set(artifact))[:3]
        only_art = sorted(set(artifact) - set(baseline))[:3]
        raise BadInputError(
            f"baseline and artifact were scored on different items (baseline only: {only_base}, "
            f"artifact only: {only_art}); rerun both with the same limits and seed"
        )
    if not baseline:
        raise BadInputError("no scored items to compare")
    diffs = [baseline[k] - artifact[k] for k in sorted(baseline)]
    n = len(diffs)
    mean = sum(diffs) / n
    var = sum((d - mean) ** 2 for d in diffs) / (n - 1) if n > 1 else 0.0
    half = Z_95 * math.sqrt(var / n)
    return PairedDrop(
        n=n,
        drop=mean,
        ci_low=mean - half,
        ci_high=mean + half,
        baseline_only=sum(d > 0 for d in diffs),
        artifact_only=sum(d < 0 for d in diffs),
    )


def decide(
    baseline: dict[str, TaskResult],
    artifact: dict[str, TaskResult],
    gate: GateConfig,
    quality: QualityResult | None = None,
) -> GateDecision:
    """Ship only if every task with a budget, and every quality budget, stays within it."""
    if gate.quality is not None and quality is None:
        raise BadInputError("gate.quality is set but no quality measurement was made")
    verdicts = []
    for task, base in baseline.items():
        art = artifact[task]
        if base.metric != art.metric:
            raise BadInputError(f"{task}: baseline metric {base.metric} != artifact {art.metric}")
        budget = gate.budgets.get(task)
        paired = paired_drop(base.items, art.items)
        passed = budget is None or base.value - art.value <= budget.max_drop
        verdicts.append(
            TaskVerdict(
                task=task,
                metric=base.metric,
                baseline=base.value,
                artifact=art.value,
                max_drop=None if budget is None else budget.max_drop,
                paired=paired,
                passed=passed,
            )
        )
    checks = [] if gate.quality is None else quality_verdicts(gate.quality, quality)
    passed = all(v.passed for v in verdicts) and all(q.passed for q in checks)
    return GateDecision("ship" if passed else "reject", verdicts, checks)
