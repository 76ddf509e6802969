"""The report's plots: distillation loss curves (PNG files beside the report), the gate's
checks and a sweep of artifacts (PNG bytes for the HTML page)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

PLOT_PREFIX = "report-"  # artifact files named report-* are written after the manifest


def loss_curve_name(stage_index: int) -> str:
    return f"{PLOT_PREFIX}distill-loss-stage{stage_index}.png"


def write_loss_curves(stages: list[dict[str, Any]], directory: Path) -> list[str]:
    """One PNG per distill stage (loss, KL and task terms per step); returns the file names.

    Needs matplotlib (the `report` extra); without it nothing is written and the curve stays
    in report.json.
    """
    curves = [(s["index"], s["details"]["curve"]) for s in stages if s["type"] == "distill"]
    plt = _pyplot() if curves else None
    if plt is None:
        return []
    names = []
    for index, curve in curves:
        figure, axis = plt.subplots(figsize=(6, 3.5), dpi=120)
        steps = [point["step"] for point in curve]
        for key, label in (("loss", "total"), ("kd", "KL (× T²)"), ("task", "next-token CE")):
            if all(key in point for point in curve):
                axis.plot(steps, [point[key] for point in curve], label=label)
        axis.set_xlabel("optimizer step")
        axis.set_ylabel("loss")
        axis.set_title(f"distillation, stage {index}")
        axis.legend()
        axis.grid(alpha=0.3)
        figure.tight_layout()
        name = loss_curve_name(index)
        tmp = directory / f".{name}.tmp"
        figure.savefig(tmp, format="png")
        plt.close(figure)
        tmp.replace(directory / name)
        names.append(name)
    return names


def _pyplot():
    """matplotlib's pyplot on the Agg backend, or None without the `report` extra."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: the report has no plots")
        return None
    return plt


def _png(figure: Any) -> bytes:
    import io

    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def gate_figure(gate: dict[str, Any]) -> bytes | None:
    """Per gated task: baseline and artifact with the artifact's interval and the budget line
    (the lowest accuracy the budget accepts); per quality budget: value, interval and limit."""
    plt = _pyplot()
    checks = [t for t in gate["tasks"]] + list(gate.get("quality") or [])
    if plt is None or not checks:
        return None
    confidence = f"{gate['confidence']:.0%}"
    figure, axes = plt.subplots(
        1, len(checks), figsize=(3.2 * len(checks), 3.4), dpi=110, squeeze=False
    )
    colors = {"ship": "#2e7d32", "reject": "#c62828", "inconclusive": "#ef6c00"}
    for axis, check in zip(axes[0], checks, strict=True):
        color = colors.get(check["outcome"], "#555555")
        if "task" in check:
            low, high = check["interval"]  # of the drop
            base = 100 * check["baseline"]
            art = 100 * check["artifact"]
            axis.bar([0], [base], color="#90a4ae", width=0.6)
            axis.bar([1], [art], color=color, width=0.6)
            # The artifact's interval: baseline minus the drop's interval, within 0..100 %.
            bottom, top = max(0.0, base - 100 * high), min(100.0, base - 100 * low)
            axis.errorbar([1], [art], yerr=[[art - bottom], [top - art]], color="black", capsize=6)
            if check["max_drop"] is not None:
                line = base - 100 * check["max_drop"]
                axis.axhline(line, color="#c62828", linestyle="--", label="budget line")
                axis.legend(loc="lower right", fontsize=7)
            axis.set_xticks([0, 1], ["baseline", "artifact"])
            axis.set_ylim(0, max(5.0, top, base) * 1.1)  # a budget line under 0 stays off-axis
            axis.set_ylabel(f"{check['metric'].split(',')[0]} (%)")
            axis.set_title(f"{check['task']}: {check['outcome']}", fontsize=9)
        else:
            low, high = check["interval"]
            axis.errorbar(
                [0],
                [check["value"]],
                yerr=[[check["value"] - low], [high - check["value"]]],
                fmt="o",
                color=color,
                capsize=6,
            )
            axis.axhline(check["limit"], color="#c62828", linestyle="--", label="limit")
            axis.set_xticks([0], ["artifact"])
            axis.set_xlim(-1, 1)
            axis.legend(loc="best", fontsize=7)
            axis.set_title(f"{check['signal']}: {check['outcome']}", fontsize=9)
        axis.grid(axis="y", alpha=0.3)
    figure.suptitle(f"gate checks ({confidence} intervals)", fontsize=10)
    data = _png(figure)
    plt.close(figure)
    return data


def sweep_figure(reports: list[dict[str, Any]]) -> bytes | None:
    """Across artifacts: size on disk vs each task's accuracy (with intervals), colored by
    verdict, the baseline as a line."""
    plt = _pyplot()
    tasks = sorted({t["task"] for r in reports for t in r["gate"]["tasks"]})
    if plt is None or not tasks:
        return None
    figure, axes = plt.subplots(
        1, len(tasks), figsize=(4.5 * len(tasks), 3.8), dpi=110, squeeze=False
    )
    colors = {"ship": "#2e7d32", "reject": "#c62828", "inconclusive": "#ef6c00"}
    for axis, task in zip(axes[0], tasks, strict=True):
        baselines = []
        for report in reports:
            check = next((t for t in report["gate"]["tasks"] if t["task"] == task), None)
            if check is None:
                continue
            size = report["sizes"]["artifact_bytes"] / 1e6
            art = 100 * check["artifact"]
            low, high = check["interval"]
            base = 100 * check["baseline"]
            baselines.append(base)
            axis.errorbar(
                [size],
                [art],
                yerr=[[art - (base - 100 * high)], [(base - 100 * low) - art]],
                fmt="o",
                color=colors.get(report["verdict"], "#555555"),
                capsize=4,
            )
            axis.annotate(
                report["recipe"], (size, art), fontsize=7, xytext=(4, 4), textcoords="offset points"
            )
        if baselines and len({round(b, 9) for b in baselines}) == 1:  # one shared baseline
            axis.axhline(baselines[0], color="#607d8b", linestyle=":", label="baseline")
            axis.legend(loc="lower right", fontsize=7)
        axis.set_xlabel("artifact size (MB)")
        axis.set_ylabel("accuracy (%)")
        axis.set_title(task, fontsize=10)
        axis.grid(alpha=0.3)
    data = _png(figure)
    plt.close(figure)
    return data
