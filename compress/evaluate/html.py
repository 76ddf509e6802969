"""report.html: one self-contained page (inline CSS, plots as data URIs) per artifact, and one
for a sweep of artifacts (`compress report`). It shows what report.json holds; nothing here
decides anything."""

from __future__ import annotations

import base64
from html import escape
from pathlib import Path
from typing import Any

from compress.evaluate.plots import gate_figure, sweep_figure
from compress.evaluate.report import (
    ADJUSTED_NOTE,
    drop_adjusted,
    drop_text,
    outcome_text,
    quality_scale_note,
    window_convention,
)

STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1100px;
       color: #1c1c1c; padding: 0 1em; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; }
h2 { font-size: 1.2em; margin-top: 1.8em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.6em 0; }
th, td { border: 1px solid #d0d0d0; padding: 4px 8px; text-align: right; }
th { background: #f3f3f3; }
td:first-child, th:first-child { text-align: left; }
.badge { display: inline-block; padding: 2px 10px; border-radius: 4px; color: white;
         font-weight: bold; vertical-align: middle; }
.ship { background: #2e7d32; } .reject { background: #c62828; }
.inconclusive { background: #ef6c00; } .muted { color: #666; }
img { max-width: 100%; }
"""


def _badge(verdict: str) -> str:
    return f'<span class="badge {escape(verdict)}">{escape(verdict.upper())}</span>'


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _img(png: bytes | None, alt: str) -> str:
    if png is None:  # plots.py logged why; the page goes on without the picture
        return f'<p class="muted">({escape(alt)}: no plot; matplotlib is missing or failed)</p>'
    data = base64.b64encode(png).decode()
    return f'<img alt="{escape(alt)}" src="data:image/png;base64,{data}">'


def _table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{escape(str(h))}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{escape(str(c))}</td>" for c in row) + "</tr>" for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def gate_section(gate: dict[str, Any]) -> str:
    level = f"{gate['confidence']:.0%}"
    parts = [f"<p>{escape(gate['rule'])}.</p>", _img(gate_figure(gate), "gate checks")]
    rows = []
    for t in gate["tasks"]:
        low, high = t["interval"]
        rows.append(
            [
                t["task"],
                t["metric"],
                t["estimate"]["n"],
                _pct(t["baseline"]),
                _pct(t["artifact"]),
                drop_text(t),
                f"[{_pct(low)}, {_pct(high)}]",
                _pct(t["upper"]),
                "—" if t["max_drop"] is None else _pct(t["max_drop"]),
                t["rule"],
                outcome_text(t),
            ]
        )
    parts.append(
        _table(
            [
                "task",
                "metric",
                "items",
                "baseline",
                "artifact",
                "drop (pts)",
                f"{level} CI",
                "upper bound",
                "budget (pts)",
                "rule",
                "outcome",
            ],
            rows,
        )
    )
    if any(drop_adjusted(t) for t in gate["tasks"]):
        parts.append(f'<p class="muted">{escape(ADJUSTED_NOTE)}</p>')
    if gate.get("quality"):
        quality_rows = [
            [
                q["signal"],
                f"{q['value']:.4f}",
                f"[{q['interval'][0]:.4f}, {q['interval'][1]:.4f}]",
                f"{q['bound']:.4f}",
                ("≤ " if q["kind"] == "max" else "≥ ") + f"{q['limit']:.4f}",
                q["rule"],
                outcome_text(q),
            ]
            for q in gate["quality"]
        ]
        parts.append(
            _table(
                [
                    "quality budget",
                    "value",
                    f"{level} CI",
                    "conservative bound",
                    "limit",
                    "rule",
                    "outcome",
                ],
                quality_rows,
            )
        )
        note = quality_scale_note(gate["quality"])
        if note:
            parts.append(f'<p class="muted">{escape(note)}</p>')
    sequential = gate.get("sequential")
    if sequential:
        parts.append(
            f"<p>Sequential evaluation: stopped at look {sequential['look']} of "
            f"{sequential['looks']}; {sequential['items_used']:,} of "
            f"{sequential['items_planned']:,} artifact items scored.</p>"
        )
    return "\n".join(parts)


def _evaluation_section(evaluation: dict[str, Any]) -> str:
    rows = []
    for name, result in (evaluation.get("baseline") or {}).items():
        info = result.get("info", {})
        versions = info.get("task_versions") or {}
        distinct = sorted({str(v) for v in versions.values()})
        rows.append(
            [
                name,
                info.get("lm_eval_version", "?"),
                ", ".join(distinct) or "?",
                info.get("num_fewshot", "?"),
                info.get("seed", "?"),
                info.get("limit", "all"),
                info.get("batch_size", "?"),
                info.get("dtype", "?"),
                info.get("device", "?"),
                info.get("data_source", "?"),
            ]
        )
    if not rows:
        return ""
    return "<h2>Evaluation settings (baseline run)</h2>" + _table(
        [
            "task",
            "lm-eval",
            "task version",
            "few-shot",
            "seed",
            "limit",
            "batch",
            "dtype",
            "device",
            "data",
        ],
        rows,
    )


def render_report_html(report: dict[str, Any], directory: Path) -> str:
    """The artifact's page; loss-curve PNGs beside the report are embedded."""
    parts = [
        f"<h1>{escape(report['recipe'])} {_badge(report['verdict'])}</h1>",
        f'<p class="muted">source <code>{escape(report["source"]["display"])}</code> '
        f"(sha256 {escape(report['source']['sha256'][:16])}…)"
        + (f", {escape(report['created'])}" if report.get("created") else "")
        + "</p>",
        "<h2>Gate</h2>",
        gate_section(report["gate"]),
    ]
    quality = report.get("quality")
    if quality:
        parts += [
            "<h2>Quality on held-out text</h2>",
            _table(
                [
                    "windows",
                    "tokens",
                    "perplexity (baseline)",
                    "perplexity (artifact)",
                    "KL / token",
                    "top-1 agreement",
                ],
                [
                    [
                        quality["num_windows"],
                        f"{quality['num_tokens']:,}",
                        f"{quality['baseline_perplexity']:.3f}",
                        f"{quality['perplexity']:.3f}",
                        f"{quality['kl_divergence']:.4f}",
                        f"{_pct(quality['top1_agreement'])}%",
                    ]
                ],
            ),
            f"<p>{escape(window_convention(report['evaluation'].get('windows')))}</p>",
        ]
    sizes = report["sizes"]
    size_rows = [["artifact on disk", f"{sizes['artifact_bytes'] / 1e6:.1f} MB"]]
    if sizes.get("quantized_layers_bytes_before"):
        size_rows.append(
            [
                "quantized layers",
                f"{sizes['quantized_layers_bytes_after'] / 1e6:.1f} MB vs "
                f"{sizes['quantized_layers_bytes_before'] / 1e6:.1f} MB "
                f"({sizes['quantized_layers_ratio']:.3f}×)",
            ]
        )
    parts += ["<h2>Size</h2>", _table(["what", "size"], size_rows)]
    stage_rows = [
        [s["index"], s["type"], s["summary"], f"{s['seconds']:.1f}"] for s in report["stages"]
    ]
    parts += ["<h2>Stages</h2>", _table(["#", "stage", "summary", "time (s)"], stage_rows)]
    for name in report.get("plots", []):
        path = directory / name
        if path.is_file():
            parts.append(_img(path.read_bytes(), name))
    parts.append(_evaluation_section(report.get("evaluation", {})))
    timings = [[step, f"{sec:.1f}"] for step, sec in report.get("timings_s", {}).items()]
    parts += ["<h2>Time</h2>", _table(["step", "seconds"], timings)]
    return _page(f"{report['recipe']}: {report['verdict']}", parts)


def render_sweep_html(reports: list[dict[str, Any]]) -> str:
    """Size vs accuracy across artifacts (each point with its interval and verdict)."""
    rows = []
    for r in sorted(reports, key=lambda r: r["sizes"]["artifact_bytes"]):
        tasks = ", ".join(
            f"{t['task']} {_pct(t['artifact'])} ({drop_text(t)} pts drop)"
            for t in r["gate"]["tasks"]
        )
        kl = (r.get("quality") or {}).get("kl_divergence")
        rows.append(
            [
                r["recipe"],
                r["verdict"],
                f"{r['sizes']['artifact_bytes'] / 1e6:.1f}",
                "—" if kl is None else f"{kl:.4f}",
                tasks,
            ]
        )
    parts = [
        f"<h1>Sweep of {len(reports)} artifacts</h1>",
        _img(sweep_figure(reports), "size vs accuracy"),
        _table(["recipe", "verdict", "size (MB)", "KL / token", "tasks"], rows),
    ]
    return _page("compress sweep", parts)


def _page(title: str, parts: list[str]) -> str:
    body = "\n".join(p for p in parts if p)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{escape(title)}</title><style>{STYLE}</style></head>\n"
        f"<body>\n{body}\n</body></html>\n"
    )
