"""The artifact's model card, `README.md`, after the Hugging Face convention: YAML front matter
(licence, base model, tags), then what was done, the scores with their intervals, the verdict,
and the recipe. Written after evaluation, beside report.json."""

from __future__ import annotations

from typing import Any

import yaml

import compress
from compress.evaluate.report import gate_lines


def _tags(stages: list[dict[str, Any]]) -> list[str]:
    tags = ["compress"]
    for stage in stages:
        kind = stage["type"]
        if kind == "quantize":
            details = stage.get("details", {})
            scheme = details.get("scheme")
            tags += ["quantized"] + ([str(scheme)] if scheme else [])
            if scheme == "mixed":
                tags += ["mixed-precision", *details.get("schemes", {})]
        elif kind == "prune":
            tags.append("pruned")
        elif kind == "distill":
            tags.append("distilled")
    return sorted(set(tags))


def render_model_card(
    report: dict[str, Any], recipe_yaml: str, license_name: str | None, base_model: str | None
) -> str:
    front: dict[str, Any] = {
        "license": license_name or "other",
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        "tags": _tags(report["stages"]),
    }
    if base_model:
        front["base_model"] = base_model
    source = report["source"]
    licence_line = (
        f"The source model is licensed under **{license_name}**; this artifact is a derivative "
        "of it and inherits its terms."
        if license_name
        else "The source model's files do not declare a licence: check its terms before "
        "redistributing this artifact."
    )
    stages = "\n".join(
        f"{s['index'] + 1}. **{s['type']}**: {s['summary']}" for s in report["stages"]
    )
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False).strip(),
        "---",
        "",
        f"# {report['recipe']}",
        "",
        f"Compressed from `{source['display']}` (sha256 `{source['sha256'][:16]}…`) by "
        f"compress {compress.__version__}. Release gate verdict: **{report['verdict'].upper()}**.",
        "",
        "## What was done",
        "",
        stages,
        "",
        f"Artifact size on disk: {report['sizes']['artifact_bytes'] / 1e6:.1f} MB.",
        "",
        "## Scores against the source model",
        "",
        *gate_lines(report["gate"]),
        "",
        "Drops are baseline − artifact on the same items, in points; intervals are paired. "
        "Quality signals on held-out text are shown in their own units (perplexity increase "
        "as a fraction, top-1 agreement as a share). "
        "The full numbers are in `report.json`, the plots in `report.html`.",
        "",
        "## Use",
        "",
        "```python",
        "import compress",
        "",
        'model, tokenizer = compress.load("path/to/this/artifact")  # verifies every file\'s hash',
        "```",
        "",
        "## Licence",
        "",
        licence_line,
        "",
        "## Recipe",
        "",
        "```yaml",
        recipe_yaml.strip(),
        "```",
        "",
    ]
    return "\n".join(lines)
