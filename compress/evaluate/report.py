"""report.json and report.md: what was measured, what was decided, what it cost."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from compress.evaluate.gate import GateDecision
from compress.evaluate.plots import layer_and_column, loss_curve_name


def build_report(
    *,
    recipe_name: str,
    decision: GateDecision,
    stages: list[dict[str, Any]],
    sizes: dict[str, Any],
    timings: dict[str, float],
    evaluation: dict[str, Any],
    source: dict[str, Any],
    quality: dict[str, Any] | None = None,
    gate_config: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return {
        "recipe": recipe_name,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "verdict": decision.verdict,
        "gate": decision.to_dict(),
        "gate_config": gate_config,  # what `compress gate --replay` decides with
        "source": source,
        "evaluation": evaluation,
        "quality": quality,
        "stages": stages,
        "sizes": sizes,
        "timings_s": timings,
    }


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _mb(n: int | float) -> str:
    return f"{n / 1e6:.1f} MB"


def gate_lines(gate: dict[str, Any]) -> list[str]:
    """The task and quality-budget tables of a gate decision (report.md, `compress gate`)."""
    confidence = gate["confidence"]
    two_sided = f"{confidence:.0%}"
    lines = [
        f"Gate: {gate['rule']}.",
        "",
        f"| task | metric | items | baseline | artifact | drop (pts) | {two_sided} CI (pts) "
        "| upper bound (pts) | budget (pts) | rule | outcome |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for t in gate["tasks"]:
        budget = "—" if t["max_drop"] is None else _pct(t["max_drop"])
        low, high = t["interval"]
        lines.append(
            f"| {t['task']} | {t['metric']} | {t['estimate']['n']} | {_pct(t['baseline'])} "
            f"| {_pct(t['artifact'])} | {drop_text(t)} | [{_pct(low)}, {_pct(high)}] "
            f"| {_pct(t['upper'])} | {budget} | {t['rule']} | {outcome_text(t)} |"
        )
    if any(drop_adjusted(t) for t in gate["tasks"]):
        lines += ["", ADJUSTED_NOTE]
    if gate.get("quality"):
        lines += [
            "",
            f"| quality budget | value | {two_sided} CI | conservative bound | limit | rule "
            "| outcome |",
            "|---|---|---|---|---|---|---|",
        ]
        for q in gate["quality"]:
            side = "≤" if q["kind"] == "max" else "≥"
            low, high = q["interval"]
            lines.append(
                f"| {q['signal']} | {q['value']:.4f} | [{low:.4f}, {high:.4f}] "
                f"| {q['bound']:.4f} | {side} {q['limit']:.4f} | {q['rule']} | {outcome_text(q)} |"
            )
        note = quality_scale_note(gate["quality"])
        if note:
            lines += ["", note]
    sequential = gate.get("sequential")
    if sequential:
        lines += [
            "",
            f"Sequential evaluation: stopped at look {sequential['look']} of "
            f"{sequential['looks']}, {sequential['items_used']:,} of "
            f"{sequential['items_planned']:,} artifact items scored.",
        ]
    return lines


ADJUSTED_NOTE = (
    "adj.: the drop the interval and upper bound are built around (Agresti–Min: half a "
    "pseudo-count in each cell of the paired 0/1 table, which pulls it toward 0)."
)


def task_center(task: dict[str, Any]) -> float:
    """The drop a task's interval is built around (older reports hold it only in "estimate")."""
    return task.get("center", task["estimate"]["center"])


def drop_adjusted(task: dict[str, Any]) -> bool:
    """Whether the interval's own estimate differs from the plain drop at the shown precision."""
    return _pct(task_center(task)) != _pct(task["drop"])


def drop_text(task: dict[str, Any]) -> str:
    """The plain drop (baseline − artifact), and the adjusted one the interval is built around
    where the two differ as shown: with few items on a collapsed task, the plain drop can lie
    outside the interval, and the table must not look self-contradictory."""
    drop = _pct(task["drop"])
    return f"{drop} (adj. {_pct(task_center(task))})" if drop_adjusted(task) else drop


def quality_scale_note(quality: list[dict[str, Any]]) -> str:
    """On which scale each quality signal was decided (the table shows its own scale)."""
    decided_on = [f"{q['signal']} on the {q['check']['scale']}" for q in quality if "check" in q]
    if not decided_on:
        return ""  # a report written before the check's scale was recorded
    return (
        "Values, intervals, bounds and limits are on each signal's own scale; the gate decides "
        f"on a larger-is-worse one: {'; '.join(decided_on)} (the `check` entries of the JSON "
        "report)."
    )


def outcome_text(check: dict[str, Any]) -> str:
    """A check's outcome for a table; inconclusive ones say how much more would decide."""
    outcome = check["outcome"]
    if outcome == "inconclusive":
        needed = check.get("needed")
        unit = "windows" if "signal" in check else "items"  # quality checks are over windows
        return "inconclusive" + ("" if needed is None else f" (~{needed:,} {unit} would decide)")
    return {"ship": "pass", "reject": "FAIL", "reported": "reported"}[outcome]


def window_convention(windows: dict[str, Any] | None) -> str:
    """One sentence: whether calibration and held-out windows start with BOS, as in use."""
    if not windows:
        return ""
    if windows["starts_with_bos"]:
        return (
            f"Every window starts with BOS (`{windows['bos_token']}`, id {windows['bos_token_id']})"
            ", as the tokenizer feeds the model in use."
        )
    return "Windows are text tokens only: the tokenizer adds no BOS."


def render_markdown(report: dict[str, Any]) -> str:
    lines = [
        f"# {report['recipe']}: {report['verdict'].upper()}",
        "",
        f"Source: `{report['source']['display']}` (sha256 `{report['source']['sha256'][:16]}…`)",
        "",
        *gate_lines(report["gate"]),
    ]
    quality = report.get("quality")
    if quality:
        lines += [
            "",
            "## Quality on held-out text",
            "",
            f"{quality['num_windows']} windows, {quality['num_tokens']:,} predicted tokens. "
            + window_convention(report["evaluation"].get("windows")),
            "",
            "| perplexity (baseline) | perplexity (artifact) | KL(baseline ‖ artifact) / token "
            "| top-1 agreement |",
            "|---|---|---|---|",
            f"| {quality['baseline_perplexity']:.3f} | {quality['perplexity']:.3f} "
            f"| {quality['kl_divergence']:.4f} | {_pct(quality['top1_agreement'])}% |",
        ]
    sizes = report["sizes"]
    lines += [
        "",
        "## Size",
        "",
        f"- artifact on disk: {_mb(sizes['artifact_bytes'])}",
    ]
    if sizes.get("quantized_layers_bytes_before"):
        lines.append(
            f"- quantized layers: {_mb(sizes['quantized_layers_bytes_after'])} vs "
            f"{_mb(sizes['quantized_layers_bytes_before'])} in {sizes['source_dtype']} "
            f"({sizes['quantized_layers_ratio']:.3f}×)"
        )
    lines += _pruning_lines(report["stages"])
    lines += _distill_lines(report["stages"], report.get("plots", []))
    if report.get("search"):
        lines += search_lines(report["search"], report.get("plots", []))
    lines += [
        "",
        "## Stages",
        "",
        "| # | stage | summary | time (s) | peak RSS (+ over its start) | peak CUDA |",
        "|---|---|---|---|---|---|",
    ]
    for s in report["stages"]:
        memory = s["memory"]
        cuda = "—" if memory["cuda_peak_bytes"] is None else _mb(memory["cuda_peak_bytes"])
        lines.append(
            f"| {s['index']} | {s['type']} | {s['summary']} | {s['seconds']:.1f} "
            f"| {_mb(memory['peak_rss_bytes'])} (+{_mb(memory['peak_rss_increase_bytes'])}) "
            f"| {cuda} |"
        )
    lines += ["", "## Time", "", "| step | seconds |", "|---|---|"]
    lines += [f"| {step} | {sec:.1f} |" for step, sec in report["timings_s"].items()]
    ev = report["evaluation"]
    lines += [
        "",
        f"Evaluation: lm-eval {ev.get('lm_eval_version', '?')}, data {ev.get('data_source')}, "
        f"baseline from cache: {ev.get('baseline_cached')}.",
        "",
    ]
    return "\n".join(lines)


def _pruning_lines(stages: list[dict[str, Any]]) -> list[str]:
    """Parameters before/after, the score used and the per-layer sizes of each prune stage."""
    lines: list[str] = []
    for s in stages:
        if s["type"] != "prune":
            continue
        d = s["details"]
        before, after = d["per_layer_before"], d["per_layer_after"]
        lines += [
            "",
            f"## Pruning (stage {s['index']})",
            "",
            f"- parameters: {d['parameters_before']:,} → {d['parameters_after']:,} "
            f"({d['parameter_ratio']:.3f}×)",
            f"- heads and FFN channels scored by: {d['criterion']}"
            + (f" (L{d['norm']} weight norm)" if d["criterion"] == "magnitude" else ""),
        ]
        if d["layers_removed"]:
            how = d["layer_criterion"] or "given by index"
            lines.append(f"- layers removed: {d['layers_removed']} ({how})")
        lines += [
            "- every kept layer has the same sizes, so `config.json` describes the model and "
            "stock transformers loads it",
            "",
            "| per layer | query heads | KV heads | head dim | FFN channels | layers |",
            "|---|---|---|---|---|---|",
            f"| before | {before['query_heads']} | {before['kv_heads']} | {before['head_dim']} "
            f"| {before['ffn_channels']} | {d['layers_before']} |",
            f"| after | {after['query_heads']} | {after['kv_heads']} | {after['head_dim']} "
            f"| {after['ffn_channels']} | {len(d['layers'])} |",
        ]
    return lines


def _distill_lines(stages: list[dict[str, Any]], plots: list[str]) -> list[str]:
    lines: list[str] = []
    for s in stages:
        if s["type"] != "distill":
            continue
        d = s["details"]
        first, last = d["loss_first"], d["loss_last"]
        lines += [
            "",
            f"## Distillation (stage {s['index']})",
            "",
            f"- {d['steps']} steps, T = {d['temperature']}, α = {d['alpha']}"
            + (f", QAT {d['qat']}" if d["qat"] else "")
            + (f", resumed at step {d['resumed_from_step']}" if d["resumed_from_step"] else ""),
            f"- loss {first['loss']:.4f} → {last['loss']:.4f}; KL term {first['kd']:.4f} → "
            f"{last['kd']:.4f}",
        ]
        plot = loss_curve_name(s["index"])
        if plot in plots:
            lines += ["", f"![distillation loss, stage {s['index']}]({plot})"]
    return lines


def search_lines(search: dict[str, Any], plots: list[str]) -> list[str]:
    """`compress search`: how the allocation was found, every candidate tried, the error rate
    of the whole procedure, and the allocation by format."""
    sensitivity = search["sensitivity"]
    lines = [
        "",
        "## Search",
        "",
        f"{search['groups']} layer groups, formats {', '.join(search['formats'])}. Sensitivity "
        f"({sensitivity.get('method', 'measured')}, {sensitivity.get('dtype', 'model')}) "
        f"measured in {sensitivity['seconds']:.0f} s on {sensitivity['windows']} × "
        f"{sensitivity['seq_len']} calibration tokens; the Hessian proxy ranks the measured "
        "KLs with "
        f"Spearman's ρ = {sensitivity['rank_correlation_proxy']:.3f}. Pareto front of "
        f"{search['front_size']} allocations; predicted KL is the sum of per-group KLs.",
        "",
        "| candidate | front point | quantized layers | predicted KL | KL (search windows) "
        "| upper bound | perplexity | verdict | formats (groups) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for number, c in enumerate(search["candidates"], 1):
        upper = "—" if c["kl_upper"] is None else f"{c['kl_upper']:.3g}"
        shipped = " (chosen)" if c["index"] == search["chosen"] else ""
        formats = ", ".join(f"{n} {f}" for f, n in c["formats"].items())
        lines.append(
            f"| {number} | {c['index']}{shipped} | {_mb(c['bytes'])} | {c['predicted_kl']:.3g} "
            f"| {c['kl']:.3g} | {upper} | {c['perplexity_increase']:+.1%} "
            f"| {'pass' if c['passed'] else 'fail'} | {formats} |"
        )
    ratios = sorted(c["kl"] / c["predicted_kl"] for c in search["candidates"] if c["predicted_kl"])
    if ratios:
        lines += [
            "",
            f"Additivity: measured / predicted KL of the candidates {ratios[0]:.2f}–"
            f"{ratios[-1]:.2f} (median {ratios[len(ratios) // 2]:.2f}). Predictions sum per-group "
            "KLs measured in isolation; the built candidate adds bf16 rounding and GPTQ's "
            "sequential interactions, which the walk corrects for.",
        ]
    uniform = ", ".join(f"{f} {_mb(b)}" for f, b in search["uniform_bytes"].items())
    lines += ["", f"Uniform formats for comparison (output layer in 16 bits): {uniform}."]
    rates = search.get("false_ships") or {}
    if rates:
        lines += [
            "",
            f"Candidates are judged on {rates['search_windows']} held-out windows the gate "
            f"never sees; the chosen one is then judged once by the gate on its own "
            f"{rates['confirm_windows']} windows and the tasks. Simulated false-ship rate of "
            f"the whole procedure ({rates['profile']['runs']} runs, KL rule "
            f"{rates['rule']}): {rates['profile']['confirmed']:.1%} on this search's profile; "
            f"{rates['worst_case']['confirmed']:.1%} at the worst case (every allocation just "
            f"over the budget), where shipping the search's own pick would give "
            f"{rates['worst_case']['unconfirmed']:.1%}.",
        ]
    lines += [f"![search]({p})" for p in plots if "search" in p]
    return lines + _allocation_table(search.get("allocation") or {})


def _allocation_table(allocation: dict[str, str]) -> list[str]:
    """The chosen format per layer group: one row per decoder layer, one column per group of
    it; groups outside the decoder (the output layer) on rows of their own."""
    rows: dict[str, dict[str, str]] = {}
    for group, fmt in allocation.items():
        layer, column = layer_and_column(group)
        rows.setdefault(layer, {})[column] = fmt
    columns = list(dict.fromkeys(c for row in rows.values() for c in row))
    if not rows:
        return []
    lines = ["", "| layer | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for layer, row in rows.items():
        lines.append(f"| {layer} | " + " | ".join(row.get(c, "") for c in columns) + " |")
    return lines
