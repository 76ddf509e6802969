"""Plots that go beside the report: the distillation loss curve of each distill stage."""

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
    if not curves:
        return []
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no loss-curve PNG (the curve is in report.json)")
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
