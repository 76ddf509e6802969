"""The report's plots: distillation loss curves (PNG files beside the report), the gate's
checks and a sweep of artifacts (PNG bytes for the HTML page)."""

from __future__ import annotations

import io
import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

PLOT_PREFIX = "report-"  # report-*.png beside the report, sealed with it and the verdict


def loss_curve_name(stage_index: int) -> str:
    return f"{PLOT_PREFIX}distill-loss-stage{stage_index}.png"


def write_loss_curves(stages: list[dict[str, Any]], directory: Path) -> list[str]:
    """One PNG per distill stage (loss, KL and task terms per step); returns the file names.

    Needs matplotlib (the `report` extra); without it nothing is written and the curve stays
    in report.json. Never raises: a curve that cannot be drawn or written is skipped with a
    warning (the verdict and the exit code must not depend on a plot).
    """
    try:
        curves = [(s["index"], s["details"]["curve"]) for s in stages if s["type"] == "distill"]
        plt = _pyplot() if curves else None
    except Exception as exc:
        _not_drawn("distillation loss curves", exc)
        return []
    if plt is None:
        return []
    names = []
    for index, curve in curves:
        name = loss_curve_name(index)
        tmp = directory / f".{name}.tmp"
        try:
            _draw_loss_curve(plt, index, curve, tmp)
            tmp.replace(directory / name)
        except Exception as exc:
            _not_drawn(f"distillation loss curve of stage {index}", exc)
            with suppress(OSError):
                tmp.unlink(missing_ok=True)
            continue
        names.append(name)
    return names


def _draw_loss_curve(plt: Any, index: int, curve: list[dict[str, float]], path: Path) -> None:
    with _figure(plt, figsize=(6, 3.5), dpi=120) as (figure, axis):
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
        figure.savefig(path, format="png")


def _not_drawn(what: str, exc: BaseException) -> None:
    """A plot is decoration: say why it is missing and carry on."""
    log.warning("%s not drawn: %s: %s", what, type(exc).__name__, exc)


@contextmanager
def _figure(plt: Any, **kwargs: Any) -> Iterator[tuple[Any, Any]]:
    """`plt.subplots(**kwargs)`, closed however the drawing ends (no figure leaks on error)."""
    figure, axes = plt.subplots(**kwargs)
    try:
        yield figure, axes
    finally:
        plt.close(figure)


def _pyplot() -> Any:
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
    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def error_bar(center: float, low: float, high: float) -> list[list[float]]:
    """matplotlib's `yerr` for an interval drawn at `center`: never negative, even when the
    center lies outside the (clipped) interval or rounding puts it a hair past an end."""
    return [[max(0.0, center - low)], [max(0.0, high - center)]]


def task_interval_pct(check: dict[str, Any]) -> tuple[float, float, float]:
    """(bottom, center, top) of the artifact's score implied by the drop's interval, in %:
    baseline minus the drop's interval, clipped to 0..100, around the drop the interval is
    built around (`center`; reports written before it existed hold it in "estimate")."""
    base = 100 * check["baseline"]
    low, high = check["interval"]  # of the drop
    center = check.get("center", check["estimate"]["center"])
    bottom, top = max(0.0, base - 100 * high), min(100.0, base - 100 * low)
    return bottom, min(max(base - 100 * center, bottom), top), top


COLORS = {"ship": "#2e7d32", "reject": "#c62828", "inconclusive": "#ef6c00"}


def gate_figure(gate: dict[str, Any]) -> bytes | None:
    """Per gated task: baseline and artifact with the artifact's interval and the budget line
    (the lowest accuracy the budget accepts); per quality budget: value, interval and limit,
    on the signal's own scale. None without matplotlib or when drawing fails (logged)."""
    try:
        checks = list(gate.get("tasks") or []) + list(gate.get("quality") or [])
        plt = _pyplot() if checks else None
        return None if plt is None else _gate_figure(plt, gate, checks)
    except Exception as exc:
        _not_drawn("gate figure", exc)
        return None


def _gate_figure(plt: Any, gate: dict[str, Any], checks: list[dict[str, Any]]) -> bytes:
    confidence = f"{gate['confidence']:.0%}"
    size = {"figsize": (3.2 * len(checks), 3.4), "dpi": 110, "squeeze": False}
    with _figure(plt, nrows=1, ncols=len(checks), **size) as (figure, axes):
        for axis, check in zip(axes[0], checks, strict=True):
            color = COLORS.get(check["outcome"], "#555555")
            if "task" in check:
                _task_axis(axis, check, color)
            else:
                _quality_axis(axis, check, color)
            axis.grid(axis="y", alpha=0.3)
        figure.suptitle(f"gate checks ({confidence} intervals)", fontsize=10)
        return _png(figure)


def _task_axis(axis: Any, check: dict[str, Any], color: str) -> None:
    base, art = 100 * check["baseline"], 100 * check["artifact"]
    axis.bar([0], [base], color="#90a4ae", width=0.6)
    axis.bar([1], [art], color=color, width=0.6)
    bottom, center, top = task_interval_pct(check)
    yerr = error_bar(center, bottom, top)
    axis.errorbar([1], [center], yerr=yerr, fmt="none", ecolor="black", capsize=6)
    if check["max_drop"] is not None:
        line = base - 100 * check["max_drop"]
        axis.axhline(line, color="#c62828", linestyle="--", label="budget line")
        axis.legend(loc="lower right", fontsize=7)
    axis.set_xticks([0, 1], ["baseline", "artifact"])
    axis.set_ylim(0, max(5.0, top, base) * 1.1)  # a budget line under 0 stays off-axis
    axis.set_ylabel(f"{check['metric'].split(',')[0]} (%)")
    axis.set_title(f"{check['task']}: {check['outcome']}", fontsize=9)


def _quality_axis(axis: Any, check: dict[str, Any], color: str) -> None:
    value = check["value"]
    low, high = check["interval"]  # the signal's own scale, like value and limit
    yerr = error_bar(value, low, high)
    axis.errorbar([0], [value], yerr=yerr, fmt="o", color=color, capsize=6)
    axis.axhline(check["limit"], color="#c62828", linestyle="--", label="limit")
    axis.set_xticks([0], ["artifact"])
    axis.set_xlim(-1, 1)
    axis.legend(loc="best", fontsize=7)
    axis.set_title(f"{check['signal']}: {check['outcome']}", fontsize=9)


def sweep_figure(reports: list[dict[str, Any]]) -> bytes | None:
    """Across artifacts: size on disk vs each task's accuracy (with intervals), colored by
    verdict, the baseline as a line. None without matplotlib or when drawing fails (logged)."""
    try:
        tasks = sorted({t["task"] for r in reports for t in r["gate"]["tasks"]})
        plt = _pyplot() if tasks else None
        return None if plt is None else _sweep_figure(plt, reports, tasks)
    except Exception as exc:
        _not_drawn("sweep figure", exc)
        return None


def _sweep_figure(plt: Any, reports: list[dict[str, Any]], tasks: list[str]) -> bytes:
    size = {"figsize": (4.5 * len(tasks), 3.8), "dpi": 110, "squeeze": False}
    with _figure(plt, nrows=1, ncols=len(tasks), **size) as (figure, axes):
        for axis, task in zip(axes[0], tasks, strict=True):
            baselines = []
            for report in reports:
                check = next((t for t in report["gate"]["tasks"] if t["task"] == task), None)
                if check is None:
                    continue
                megabytes = report["sizes"]["artifact_bytes"] / 1e6
                art = 100 * check["artifact"]
                baselines.append(100 * check["baseline"])
                color = COLORS.get(report["verdict"], "#555555")
                bottom, center, top = task_interval_pct(check)
                axis.errorbar(
                    [megabytes],
                    [center],
                    yerr=error_bar(center, bottom, top),
                    fmt="none",
                    ecolor=color,
                    capsize=4,
                )
                axis.plot([megabytes], [art], "o", color=color)
                axis.annotate(
                    report["recipe"],
                    (megabytes, art),
                    fontsize=7,
                    xytext=(4, 4),
                    textcoords="offset points",
                )
            if baselines and len({round(b, 9) for b in baselines}) == 1:  # one shared baseline
                axis.axhline(baselines[0], color="#607d8b", linestyle=":", label="baseline")
                axis.legend(loc="lower right", fontsize=7)
            axis.set_xlabel("artifact size (MB)")
            axis.set_ylabel("accuracy (%)")
            axis.set_title(task, fontsize=10)
            axis.grid(alpha=0.3)
        return _png(figure)


# --------------------------------------------------------------------------- compress search

SEARCH_PLOTS = (f"{PLOT_PREFIX}search-front.png", f"{PLOT_PREFIX}search-allocation.png")


def write_search_plots(search: dict[str, Any], directory: Path) -> list[str]:
    """Size against KL (the front as predicted, every candidate as measured with its upper
    bound and verdict, the uniform formats, the budget and the shipped point) and the chosen
    allocation as a heat map (decoder layer × projection group). Never raises."""
    try:
        plt = _pyplot()
    except Exception as exc:
        _not_drawn("search plots", exc)
        return []
    if plt is None:
        return []
    names = []
    for name, draw in zip(SEARCH_PLOTS, (_draw_search_front, _draw_allocation), strict=True):
        tmp = directory / f".{name}.tmp"
        try:
            if not draw(plt, search, tmp):
                continue
            tmp.replace(directory / name)
        except Exception as exc:
            _not_drawn(name, exc)
            with suppress(OSError):
                tmp.unlink(missing_ok=True)
            continue
        names.append(name)
    return names


def _draw_search_front(plt: Any, search: dict[str, Any], path: Path) -> bool:
    with _figure(plt, figsize=(7, 4.2), dpi=120) as (figure, axis):
        front = search["front"]
        axis.plot(
            [p["bytes"] / 1e6 for p in front],
            [p["predicted_kl"] for p in front],
            color="#9e9e9e",
            label="front (predicted: sum of per-group KL)",
        )
        for c in search["candidates"]:
            color = COLORS["ship" if c["passed"] else "reject"]
            upper = c["kl_upper"] if c["kl_upper"] is not None else c["kl"]
            axis.errorbar(
                c["bytes"] / 1e6,
                c["kl"],
                yerr=[[0.0], [max(0.0, upper - c["kl"])]],
                fmt="o",
                color=color,
                capsize=3,
            )
        chosen = next((c for c in search["candidates"] if c["index"] == search["chosen"]), None)
        if chosen is not None:
            axis.scatter(
                [chosen["bytes"] / 1e6],
                [chosen["kl"]],
                s=180,
                facecolors="none",
                edgecolors="black",
                label="shipped candidate",
            )
        for fmt, size in search["uniform_bytes"].items():
            if fmt != "keep":
                axis.axvline(size / 1e6, color="#90caf9", linestyle=":", linewidth=1)
                axis.text(
                    size / 1e6, axis.get_ylim()[1], f" {fmt}", fontsize=7, va="top", rotation=90
                )
        budget = search.get("false_ships", {}).get("budget")
        if budget is not None:
            axis.axhline(
                budget, color=COLORS["reject"], linestyle="--", linewidth=1, label="KL budget"
            )
        axis.set_yscale("log")
        axis.set_xlabel("quantized layers (MB)")
        axis.set_ylabel("KL(baseline ‖ candidate) per token")
        axis.set_title("search: green passed, red failed (bar: upper bound)")
        axis.legend(fontsize=7)
        axis.grid(alpha=0.3)
        figure.tight_layout()
        figure.savefig(path, format="png")
    return True


def layer_and_column(group: str) -> tuple[str, str]:
    """`model.layers.3.self_attn.q_k_v` → (`model.layers.3`, `q_k_v`); a group outside the
    decoder layers (`lm_head`) → (itself, `format`)."""
    match = re.fullmatch(r"(.*\.layers\.\d+)\..*?([^.]+)", group)
    return (match.group(1), match.group(2)) if match else (group, "format")


def _draw_allocation(plt: Any, search: dict[str, Any], path: Path) -> bool:
    allocation = search.get("allocation")
    if not allocation:
        return False
    rows: dict[str, dict[str, str]] = {}
    for group, fmt in allocation.items():
        layer, column = layer_and_column(group)
        rows.setdefault(layer, {})[column] = fmt
    columns = list(dict.fromkeys(c for row in rows.values() for c in row))
    formats = list(search["formats"])
    grid = [[formats.index(row[c]) if c in row else -1 for c in columns] for row in rows.values()]
    with _figure(plt, figsize=(1.2 + 1.1 * len(columns), 1.0 + 0.22 * len(rows)), dpi=120) as (
        figure,
        axis,
    ):
        data = np.ma.masked_less(np.array(grid, dtype=float), 0)
        image = axis.imshow(data, aspect="auto", cmap="viridis", vmin=0, vmax=len(formats) - 1)
        axis.set_xticks(range(len(columns)), columns, fontsize=8)
        axis.set_yticks(range(len(rows)), [r.rpartition(".")[2] for r in rows], fontsize=6)
        axis.set_ylabel("decoder layer")
        bar = figure.colorbar(image, ticks=range(len(formats)))
        bar.ax.set_yticklabels(formats, fontsize=7)
        axis.set_title("chosen format per layer group", fontsize=9)
        figure.tight_layout()
        figure.savefig(path, format="png")
    return True
