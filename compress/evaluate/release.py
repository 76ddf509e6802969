"""`compress gate` for release pipelines: judge an artifact against its baseline, re-decide a
stored report without running a model (`--replay`), plan how many items a decision needs
(`--plan`), and write the verdict as JSON, JUnit XML and markdown.

A gate report has the keys of the pipeline's `report.json` that a decision reads
(`gate_config`, `evaluation.baseline`, `evaluation.artifact`, `quality`), so either replays.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

from compress.errors import ArtifactError, BadInputError
from compress.evaluate.gate import GateDecision, decide, gated_tasks
from compress.evaluate.lm_eval_runner import TaskResult
from compress.evaluate.quality import QualityResult, measure_quality
from compress.evaluate.report import gate_lines
from compress.evaluate.stats import binary_sd, is_binary, items_needed, paired_estimate
from compress.fileio import sha256_file
from compress.recipe import EvalConfig, GateConfig, ModelConfig
from compress.seal import MANIFEST, check_report_seal, check_signature, read_json_file

MAX_REPORT_BYTES = 1 << 30  # per-item results of full benchmarks are megabytes, not gigabytes

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Overrides:
    """Command-line changes to a gate: `--budget task=drop`, `--rule`, `--confidence`."""

    budgets: dict[str, float]
    rule: str | None = None
    confidence: float | None = None

    def apply(self, gate: dict[str, Any] | None) -> GateConfig:
        if gate is not None and not isinstance(gate, dict):
            raise BadInputError(f"gate_config: a mapping, got {type(gate).__name__}")
        data = dict(gate or {})
        if self.budgets:
            budgets = dict(data.get("budgets") or {})
            for task, drop in self.budgets.items():
                budgets[task] = {**(budgets.get(task) or {}), "max_drop": drop}
            data["budgets"] = budgets
        if self.rule is not None:
            data["rule"] = self.rule
            for budget in (data.get("budgets") or {}).values():
                budget.pop("rule", None)  # the command line's rule is for every budget
        if self.confidence is not None:
            data["confidence"] = self.confidence
        if not data:
            raise BadInputError("no gate: give --budget task=drop (or --recipe)")
        try:
            return GateConfig.model_validate(data)
        except ValueError as exc:
            raise BadInputError(f"gate: {exc}") from None


def parse_budgets(values: list[str]) -> dict[str, float]:
    """`--budget mmlu=0.02 --budget gsm8k=0.03` → {task: max drop}."""
    budgets = {}
    for value in values:
        task, sep, drop = value.partition("=")
        try:
            number = float(drop)
        except ValueError:
            number = -1.0
        if not sep or not task or not 0 <= number <= 1:
            raise BadInputError(
                f"--budget {value!r}: expected TASK=DROP with 0 ≤ DROP ≤ 1 as a fraction "
                "(0.02 = 2 points)"
            )
        budgets[task] = number
    return budgets


# --------------------------------------------------------------------------- replay


def read_report(path: Path, *, key: bytes | None = None) -> dict[str, Any]:
    """A stored report, refused unless its seal matches (and, beside an artifact, the
    artifact's manifest seals it; with `key`, that manifest is signed by it)."""
    try:
        report = read_json_file(path, limit=MAX_REPORT_BYTES)
    except ArtifactError as exc:
        raise BadInputError(f"report {exc}") from None
    if not isinstance(report, dict):
        raise BadInputError(f"{path}: a report is a JSON object, got {type(report).__name__}")
    check_report_seal(report, path)
    _check_sealed_by_manifest(path, key)
    evaluation = report.get("evaluation")
    if not isinstance(evaluation, dict) or not {"baseline", "artifact"} <= set(evaluation):
        raise BadInputError(
            f"{path}: no per-item results (evaluation.baseline / evaluation.artifact)"
        )
    return report


def _check_sealed_by_manifest(path: Path, key: bytes | None) -> None:
    """A report inside an artifact must be the one its manifest sealed."""
    from compress.artifact import read_manifest

    directory = path.parent
    if not (directory / MANIFEST).is_file():
        if key is not None:
            raise BadInputError(
                f"--key: {path} has no {MANIFEST} beside it whose signature to check"
            )
        return
    entry = read_manifest(directory)["files"].get(path.name)
    if entry is None:
        raise BadInputError(f"{path}: not sealed by {directory / MANIFEST} (not listed there)")
    if sha256_file(path) != entry["sha256"]:
        raise BadInputError(
            f"{path}: differs from the report sealed in {directory / MANIFEST}: it was edited"
        )
    if key is not None:
        check_signature(directory, key)


def stored_results(report: dict[str, Any]) -> tuple[dict, dict, QualityResult | None]:
    evaluation = report["evaluation"]
    try:
        baseline = {k: TaskResult.from_dict(v) for k, v in evaluation["baseline"].items()}
        artifact = {k: TaskResult.from_dict(v) for k, v in evaluation["artifact"].items()}
        quality = report.get("quality")
        return baseline, artifact, None if quality is None else QualityResult.from_dict(quality)
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        # A sealed report only reads wrong if its writer was not compress: say so, no traceback.
        raise BadInputError(
            f"report: malformed per-item results ({type(exc).__name__}: {exc})"
        ) from None


def replay(report: dict[str, Any], overrides: Overrides) -> GateDecision:
    """The decision from stored per-item results (identical to the stored one when nothing
    is overridden: the gate is a pure function of them)."""
    gate = overrides.apply(report.get("gate_config"))
    baseline, artifact, quality = stored_results(report)
    unknown = sorted(set(gate.budgets) - set(baseline))
    if unknown:
        raise BadInputError(
            f"budgets for tasks the report did not score: {unknown} (scored: {sorted(baseline)})"
        )
    if gate.quality is not None and quality is None:
        raise BadInputError("the gate has quality budgets but the report holds no quality data")
    return decide(baseline, artifact, gate, quality)


# --------------------------------------------------------------------------- planning


def plan(
    baseline: dict[str, TaskResult], pilot: dict[str, TaskResult], gate: GateConfig
) -> list[dict[str, Any]]:
    """Per gated task: items needed to decide its budget at the gate's confidence and power,
    from the artifact's pilot items paired with the baseline's (the discordance and the drop
    they show) and the number of items the baseline was scored on."""
    rows = []
    for task in gated_tasks(gate, baseline):
        if task not in pilot:
            raise BadInputError(f"--plan: the pilot did not score {task}")
        shared = sorted(set(pilot[task].items) & set(baseline[task].items))
        if len(shared) < 2:
            raise BadInputError(
                f"--plan: {task}: {len(shared)} pilot item(s) pair with the baseline"
            )
        base = [baseline[task].items[i] for i in shared]
        art = [pilot[task].items[i] for i in shared]
        estimate = paired_estimate(base, art)
        budget = gate.budgets[task].max_drop
        discordance = (estimate.baseline_only + estimate.artifact_only) / estimate.n
        sd_if_no_drop = binary_sd(discordance, 0.0) if is_binary(base + art) else estimate.sd
        at_pilot = items_needed(estimate.sd, budget - estimate.center, gate.alpha, gate.power)
        if_no_drop = items_needed(sd_if_no_drop or estimate.sd, budget, gate.alpha, gate.power)
        rows.append(
            {
                "task": task,
                "budget": budget,
                "pilot_items": estimate.n,
                "pilot_drop": estimate.drop,
                "discordance": discordance,
                "available": baseline[task].num_items,
                "needed_at_pilot_drop": at_pilot,
                "needed_if_no_drop": if_no_drop,
                "drop_over_budget": estimate.center >= budget,
            }
        )
    return rows


def plan_markdown(rows: list[dict[str, Any]], gate: GateConfig) -> str:
    lines = [
        f"Items to decide each budget at {gate.confidence:.0%} confidence with "
        f"{gate.power:.0%} power (one-sided non-inferiority):",
        "",
        "| task | budget (pts) | pilot items | pilot drop (pts) | discordant | baseline items "
        "| needed at the pilot's drop | needed if no drop |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        at_pilot = (
            "never" if r["needed_at_pilot_drop"] is None else f"{r['needed_at_pilot_drop']:,}"
        )
        if r["drop_over_budget"] and r["needed_at_pilot_drop"] is not None:
            at_pilot += " (to reject)"
        lines.append(
            f"| {r['task']} | {100 * r['budget']:.1f} | {r['pilot_items']} "
            f"| {100 * r['pilot_drop']:.1f} | {100 * r['discordance']:.1f}% | {r['available']:,} "
            f"| {at_pilot} | {r['needed_if_no_drop']:,} |"
        )
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- outputs


def junit_xml(decision: GateDecision, name: str) -> str:
    """One test case per gated check: a failure for reject or inconclusive, with the numbers."""
    cases = []
    for task in decision.tasks:
        cases.append(
            (
                f"task {task.task} ({task.metric})",
                task.result.outcome,
                f"drop {task.drop:.4f} (adjusted {task.estimate.center:.4f}), "
                f"{decision.confidence:.0%} interval "
                f"[{task.result.interval[0]:.4f}, {task.result.interval[1]:.4f}], upper bound "
                f"{task.result.upper:.4f}, budget {task.max_drop}, rule {task.rule}, "
                f"{task.estimate.n} items",
            )
        )
    for q in decision.quality:
        cases.append(
            (
                f"quality {q.signal}",
                q.result.outcome,
                f"value {q.value:.4f}, interval [{q.interval[0]:.4f}, {q.interval[1]:.4f}], "
                f"bound {q.bound:.4f}, limit {q.limit:.4f} ({q.kind}), rule {q.rule}",
            )
        )
    failing = [c for c in cases if c[1] in ("reject", "inconclusive")]
    suite = ElementTree.Element(
        "testsuite",
        name=f"compress gate: {name}",
        tests=str(len(cases)),
        failures=str(len(failing)),
        errors="0",
        skipped="0",
    )
    for case_name, outcome, details in cases:
        case = ElementTree.SubElement(suite, "testcase", classname="compress.gate", name=case_name)
        if outcome in ("reject", "inconclusive"):
            failure = ElementTree.SubElement(case, "failure", type=outcome, message=outcome)
            failure.text = details
        else:
            ElementTree.SubElement(case, "system-out").text = f"{outcome}: {details}"
    ElementTree.indent(suite)
    return ElementTree.tostring(suite, encoding="unicode", xml_declaration=True) + "\n"


def markdown_summary(decision: GateDecision, name: str) -> str:
    lines = [f"# {name}: {decision.verdict.upper()}", "", *gate_lines(decision.to_dict()), ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------- a live gate


def evaluate_against_baseline(
    artifact_dir: Path,
    baseline_spec: str,
    eval_cfg: EvalConfig,
    gate: GateConfig,
    *,
    trust_remote_code: bool = False,
    pilot_limit: int | None = None,
) -> dict[str, Any]:
    """Score the baseline and the artifact on the same items and return a gate report
    (decided, or with `pilot_limit` a plan from the artifact's first items per subtask).

    Everything that can be checked without a model is checked first."""
    from compress.artifact import load_artifact, read_manifest
    from compress.calibration import check_text_source
    from compress.evaluate import lm_eval_runner
    from compress.models import fingerprint, load_model, resolve_source
    from compress.pipeline import QUALITY_FIELD, capture_quality_baseline, quality_windows

    data_dir = lm_eval_runner.resolve_eval_data_dir(eval_cfg)
    lm_eval_runner.check_tasks(eval_cfg)
    unknown = sorted(set(gate.budgets) - {t.name for t in eval_cfg.tasks})
    if unknown:
        raise BadInputError(f"budgets for tasks that are not evaluated: {unknown}")
    if eval_cfg.quality is not None:
        check_text_source(eval_cfg.quality.path, field=QUALITY_FIELD)
    if gate.quality is not None and eval_cfg.quality is None:
        raise BadInputError("gate.quality needs eval.quality (the held-out text)")
    manifest = read_manifest(artifact_dir)  # fails fast on a path that is not an artifact
    dtype = manifest.get("dtype", "bfloat16")
    resolved = resolve_source(
        ModelConfig(source=baseline_spec, trust_remote_code=trust_remote_code)
    )

    model, tokenizer = load_model(resolved, dtype)
    windows = quality_windows(eval_cfg.quality, tokenizer, gated=gate.quality is not None)
    quality_baseline = capture_quality_baseline(model, windows)
    baseline = lm_eval_runner.evaluate_tasks(model, tokenizer, eval_cfg, data_dir=data_dir)
    del model

    artifact_model, artifact_tokenizer = load_artifact(artifact_dir)
    artifact_eval = eval_cfg
    if pilot_limit is not None:
        pilot_tasks = [t.model_copy(update={"limit": pilot_limit}) for t in eval_cfg.tasks]
        artifact_eval = eval_cfg.model_copy(update={"tasks": pilot_tasks})
    artifact = lm_eval_runner.evaluate_tasks(
        artifact_model, artifact_tokenizer, artifact_eval, data_dir=data_dir
    )
    quality = (
        None
        if quality_baseline is None
        else measure_quality(artifact_model, quality_baseline.windows, quality_baseline)
    )
    report: dict[str, Any] = {
        "artifact": str(artifact_dir),
        "source": {"display": resolved.display, "sha256": fingerprint(resolved)},
        "gate_config": gate.model_dump(mode="json"),
        "evaluation": {
            "backend": "lm-eval",
            "lm_eval_version": lm_eval_runner.lm_eval_version(),
            "data_source": str(data_dir) if data_dir else "hub",
            "baseline": {k: v.to_dict() for k, v in baseline.items()},
            "artifact": {k: v.to_dict() for k, v in artifact.items()},
        },
        "quality": None if quality is None else quality.to_dict(),
    }
    if pilot_limit is not None:
        report["plan"] = plan(baseline, artifact, gate)
        return report
    decision = decide(baseline, artifact, gate, quality)
    report["verdict"] = decision.verdict
    report["gate"] = decision.to_dict()
    return report
