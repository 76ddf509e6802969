"""The release gate: per-task budgets on the paired baseline-vs-artifact comparison.

The verdict rule here is the budget on the point estimate of the drop (`max_drop`); every
decision also carries the paired 95% confidence interval of the drop, computed on the items
both models answered, so a reader sees how much of the drop is noise.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Literal

from compress.errors import BadInputError
from compress.evaluate.lm_eval_runner import TaskResult
from compress.recipe import GateConfig

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
class GateDecision:
    verdict: Literal["ship", "reject"]
    tasks: list[TaskVerdict]

    def to_dict(self) -> dict:
        return {
            "verdict": self.verdict,
            "rule": "point estimate of the drop within max_drop, every gated task",
            "tasks": [{**asdict(t), "drop": t.drop} for t in self.tasks],
        }


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
    baseline: dict[str, TaskResult], artifact: dict[str, TaskResult], gate: GateConfig
) -> GateDecision:
    """Ship only if every task with a budget stays within it."""
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
    return GateDecision("ship" if all(v.passed for v in verdicts) else "reject", verdicts)
