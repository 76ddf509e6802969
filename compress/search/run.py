"""`compress search RECIPE`: the smallest artifact of the recipe's model that passes its gate.

Named steps, each in its own function:

1. **Inputs**: the recipe's own checks (`pipeline.prepare`), the model, and two sets of windows:
   sensitivity windows from the calibration text, and search windows from the held-out text,
   taken *after* the gate's own windows so the final gate judges on text the search never saw.
2. **Sensitivity** (sensitivity.py): per layer group and format, the KL with only that group
   in that format; cached under `<output.dir>/search/<name>/` by a fingerprint of everything it
   depends on, and reused with `--resume`. The Hessian proxy and its rank correlation go in the
   report beside it.
3. **Front** (allocate.py): the Pareto front of (bytes, predicted KL).
4. **Walk** (procedure.py): probe the front where the corrected prediction meets the budget
   (safeguarded bisection); each probe builds the allocation for real with the recipe's quantize
   stage (GPTQ where the recipe says so) and judges it by the gate's quality budgets on the
   search windows. Sensitivity chunks and probes run in process or as Ray tasks (executor.py).
5. **Confirm**: the smallest passing allocation becomes a recipe (`recipe.yaml` beside the
   cache: the quantize stage with `overrides` and `exclude`, and a round-to-nearest stage for
   the output layer when it is quantized), run by `compress run`'s pipeline:
   built again, scored on the gate's windows and tasks, published under its verdict as usual,
   with the search's summary sealed into its report.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

import compress
from compress.calibration import calibration_batches, evaluation_windows, load_text
from compress.errors import VERDICT_EXIT, DataError, RecipeError
from compress.evaluate.gate import Check, CheckResult, judge, quality_checks
from compress.evaluate.quality import BaselineLogProbs, baseline_logprobs, measure_quality
from compress.fileio import atomic_write_json, atomic_write_text
from compress.kernels import dense_weights_for_scoring
from compress.models import DTYPES, fingerprint, load_weights, resolve_source
from compress.pipeline import (
    QUALITY_FIELD,
    Prepared,
    RunOutcome,
    naming_the_recipe,
    output_root,
    prepare,
    stage_context,
)
from compress.pipeline import run as run_pipeline
from compress.quant.config import LayerScheme, QuantizeConfig
from compress.recipe import Recipe, load_recipe
from compress.registry import handler_for
from compress.search.allocate import Allocation, Option, pareto_front, smallest_within
from compress.search.candidates import KEEP_16, Format, storage_bytes
from compress.search.config import SearchConfig
from compress.search.executor import Executor, chunks, executor_for
from compress.search.procedure import (
    Probe,
    bisection,
    predicted_guide,
    simulate_false_ships,
    smallest_passing,
    walk_front,
)
from compress.search.sensitivity import (
    LayerGroup,
    Rounder,
    anchored_sensitivity,
    float32_copy,
    group_formats,
    group_hessians,
    layer_groups,
    measured_sensitivity,
    proxy_sensitivity,
    rank_correlation,
    stage_rounder,
)

log = logging.getLogger(__name__)

SENSITIVITY_CACHE = "sensitivity.json"
SEARCH_REPORT = "search.json"
CHOSEN_RECIPE = "recipe.yaml"


def search_dir(recipe: Recipe) -> Path:
    return output_root(recipe) / "search" / recipe.name


# --------------------------------------------------------------------------- 1. inputs


@dataclass(frozen=True)
class Inputs:
    prepared: Prepared
    model: nn.Module
    sensitivity_windows: torch.Tensor
    search_windows: torch.Tensor
    source_sha: str


def search_windows(recipe: Recipe, tokenizer: Any, config: SearchConfig) -> torch.Tensor:
    """`config.windows` held-out windows right after the gate's own (same text and length)."""
    quality = recipe.eval.quality
    assert quality is not None  # the recipe's validator
    text = load_text(quality.path, field=QUALITY_FIELD)
    gate_windows = quality.max_windows
    windows = evaluation_windows(text, tokenizer, quality.seq_len, gate_windows + config.windows)
    found = windows.shape[0] - gate_windows
    if found < 2:
        raise DataError(
            f"search.windows: {quality.path} holds {windows.shape[0]} windows of "
            f"{quality.seq_len} tokens; the gate takes the first {gate_windows}, which leaves "
            f"{max(found, 0)} for the search (2 at least; lower eval.quality.max_windows or "
            "give a longer text)"
        )
    if found < config.windows:
        log.warning(
            "search: %d held-out windows left after the gate's (asked for %d)",
            found,
            config.windows,
        )
    return windows[gate_windows:]


def load_inputs(recipe: Recipe, config: SearchConfig) -> Inputs:
    prepared = prepare(recipe)
    calibration = recipe.calibration
    if calibration is None:
        raise RecipeError("search: sensitivity is measured on calibration text; add `calibration`")
    sensitivity = calibration_batches(
        calibration.model_copy(
            update={
                "num_samples": config.sensitivity_samples,
                "seq_len": config.sensitivity_seq_len,
            }
        ),
        prepared.tokenizer,
    )
    held_out = search_windows(recipe, prepared.tokenizer, config)
    source_sha = fingerprint(prepared.source)
    model = load_weights(prepared.source, recipe.dtype)
    return Inputs(prepared, model, sensitivity, held_out, source_sha)


# --------------------------------------------------------------------------- 2. sensitivity


@dataclass(frozen=True)
class Sensitivity:
    groups: list[LayerGroup]
    formats: list[list[Format]]  # per group, the formats it can take
    measured: dict[str, dict[str, float]]
    proxy: dict[str, dict[str, float]]
    rank_correlation: float
    seconds: float


def sensitivity_key(recipe: Recipe, inputs: Inputs, config: SearchConfig) -> str:
    """What the table depends on: model, dtype, sensitivity windows, formats, our version."""
    digest = hashlib.sha256()
    for part in (
        inputs.source_sha,
        recipe.dtype,
        json.dumps(recipe.stages[0].model_dump(mode="json"), sort_keys=True),
        ",".join(config.formats),
        config.sensitivity,
        config.sensitivity_dtype,
        str(config.head),
        compress.__version__,
    ):
        digest.update(part.encode() + b"\0")
    digest.update(inputs.sensitivity_windows.numpy().tobytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class GroupTables:
    """Sensitivity of some groups: KL, proxy, and what was measured (for the rank
    correlation: anchored formats that were scaled, not measured, are left out)."""

    measured: dict[str, dict[str, float]]
    proxy: dict[str, dict[str, float]]
    ranked: dict[str, dict[str, float]]


def measure_groups(
    model: nn.Module,
    groups: Sequence[LayerGroup],
    windows: torch.Tensor,
    recipe: Recipe,
    batch_size: int,
) -> GroupTables:
    """Each format rounded as the recipe's quantize stage would store it (GPTQ where its method
    is GPTQ), measured in `search.sensitivity_dtype` (sensitivity.py)."""
    config, _ = _search_of(recipe)
    formats = list(config.parsed_formats)
    subject = float32_copy(model) if config.sensitivity_dtype == "float32" else model
    hessians = group_hessians(subject, groups, windows, batch_size=batch_size)
    rounder = allocation_rounder(recipe, groups, hessians)

    if config.sensitivity == "anchored":
        measured, proxy, anchors = anchored_sensitivity(
            subject, groups, formats, windows, hessians, batch_size=batch_size, rounder=rounder
        )
        ranked = {g: {f: measured[g][f]} for g, f in anchors.items()}
    else:
        proxy = proxy_sensitivity(subject, groups, formats, hessians, rounder)
        measured = measured_sensitivity(
            subject, groups, formats, windows, batch_size=batch_size, rounder=rounder
        )
        ranked = measured
    return GroupTables(measured, proxy, ranked)


def allocation_rounder(
    recipe: Recipe, groups: Sequence[LayerGroup], hessians: Callable[[str], torch.Tensor]
) -> Rounder:
    """Rounds each layer as `allocation_stages` will store it: decoder layers by the recipe's
    quantize stage (GPTQ where its method is), the output layer to nearest."""
    _, template = _search_of(recipe)
    scale_dtype = DTYPES[recipe.dtype]
    decoder = stage_rounder(template, scale_dtype, hessians)
    output = stage_rounder(head_stage(template, "", KEEP_16), scale_dtype, hessians)
    outside = {name for group in groups if group.output for name in group.layers}

    def rounder(name: str, weight: torch.Tensor, fmt: Format) -> torch.Tensor:
        return (output if name in outside else decoder)(name, weight, fmt)

    return rounder


@dataclass(frozen=True)
class SensitivityJob:
    recipe: Recipe
    groups: list[LayerGroup]
    windows: torch.Tensor
    batch_size: int


def sensitivity_job(job: SensitivityJob) -> GroupTables:
    """One chunk of groups, on a worker: the model reloaded from the recipe's source."""
    model = load_weights(resolve_source(job.recipe.model), job.recipe.dtype)
    return measure_groups(model, job.groups, job.windows, job.recipe, job.batch_size)


def measure(
    model: nn.Module,
    windows: torch.Tensor,
    recipe: Recipe,
    executor: Executor,
    batch_size: int,
) -> Sensitivity:
    """The sensitivity table of every group: in this process, or in one chunk of groups per
    worker."""
    start = time.perf_counter()
    config, _ = _search_of(recipe)
    groups = layer_groups(model, head=config.head)
    if executor.in_process:
        parts = [measure_groups(model, groups, windows, recipe, batch_size)]
    else:
        jobs = [
            SensitivityJob(recipe, chunk, windows, batch_size)
            for chunk in chunks(groups, executor.parallelism)
        ]
        parts = executor.map(sensitivity_job, jobs)
    measured = {g: row for part in parts for g, row in part.measured.items()}
    proxy = {g: row for part in parts for g, row in part.proxy.items()}
    ranked = {g: row for part in parts for g, row in part.ranked.items()}
    return Sensitivity(
        groups=groups,
        formats=[group_formats(model, g, config.parsed_formats) for g in groups],
        measured=measured,
        proxy=proxy,
        rank_correlation=rank_correlation(ranked, proxy),
        seconds=time.perf_counter() - start,
    )


def _search_of(recipe: Recipe) -> tuple[SearchConfig, QuantizeConfig]:
    template = recipe.stages[0]
    assert recipe.search is not None and isinstance(template, QuantizeConfig)  # the validator
    return recipe.search, template


def cached_sensitivity(
    model: nn.Module,
    windows: torch.Tensor,
    recipe: Recipe,
    executor: Executor,
    key: str,
    path: Path,
    *,
    resume: bool,
    batch_size: int,
) -> Sensitivity:
    if resume and path.is_file():
        data = json.loads(path.read_text())
        if data.get("key") == key:
            log.info("search: sensitivity from %s (measured in %.0f s)", path, data["seconds"])
            return Sensitivity(
                groups=[
                    LayerGroup(g["name"], tuple(g["layers"]), g.get("output", False))
                    for g in data["groups"]
                ],
                formats=[[Format.parse(n) for n in names] for names in data["formats"]],
                measured=data["measured"],
                proxy=data["proxy"],
                rank_correlation=data["rank_correlation"],
                seconds=data["seconds"],
            )
        log.info("search: %s was measured for other inputs; measuring again", path)
    table = measure(model, windows, recipe, executor, batch_size)
    atomic_write_json(
        path,
        {
            "key": key,
            "groups": [asdict(g) for g in table.groups],
            "formats": [[f.name for f in fs] for fs in table.formats],
            "measured": table.measured,
            "proxy": table.proxy,
            "rank_correlation": table.rank_correlation,
            "seconds": table.seconds,
        },
    )
    log.info(
        "search: sensitivity of %d groups measured in %.0f s; the Hessian proxy ranks them "
        "with Spearman's ρ = %.3f against the measured KL",
        len(table.groups),
        table.seconds,
        table.rank_correlation,
    )
    return table


# --------------------------------------------------------------------------- 3. front


def group_bytes(model: nn.Module, group: LayerGroup, fmt: Format) -> int:
    layers = [model.get_submodule(name) for name in group.layers]
    return sum(storage_bytes(fmt, m.out_features, m.in_features) for m in layers)


def front_of(model: nn.Module, table: Sensitivity, resolution: int) -> list[Allocation]:
    options = [
        [Option(group_bytes(model, g, f), table.measured[g.name][f.name]) for f in fs]
        for g, fs in zip(table.groups, table.formats, strict=True)
    ]
    return pareto_front(options, resolution=resolution)


def chosen_formats(table: Sensitivity, allocation: Allocation) -> list[Format]:
    return [fs[c] for fs, c in zip(table.formats, allocation.choices, strict=True)]


def head_stage(template: QuantizeConfig, head: str, fmt: Format) -> QuantizeConfig:
    """The output layer's own stage: round to nearest with the template's observer (GPTQ
    calibrates decoder layers only)."""
    return QuantizeConfig(
        method="rtn",
        bits=fmt.bits if fmt.bits != 16 else 8,
        group_size=fmt.group_size,
        symmetric=fmt.symmetric,
        observer=template.observer,
        include=[head] if head else None,
    )


def allocation_stages(
    template: QuantizeConfig, groups: Sequence[LayerGroup], formats: Sequence[Format]
) -> list[QuantizeConfig]:
    """The quantize stages storing each group in its format. The decoder's groups: one stage,
    the template with one override per format other than its own (exact layer names) and the
    groups kept in 16 bits in `exclude`; what the search does not choose for (MoE experts)
    keeps the template's own scheme, as the recipe says. The output layer (a group
    outside the decoder, `head_group`), when quantized: a round-to-nearest stage of its own."""
    by_format: dict[Format, list[str]] = defaultdict(list)
    stages: list[QuantizeConfig] = []
    for group, fmt in zip(groups, formats, strict=True):
        if group.output:
            if fmt != KEEP_16:
                stages.append(head_stage(template, group.layers[0], fmt))
            continue
        by_format[fmt].extend(group.layers)
    kept = by_format.pop(KEEP_16, [])
    if not by_format:
        if not stages:
            raise ValueError("an allocation that quantizes nothing")
        return stages
    own = Format(template.bits, template.group_size, template.symmetric)
    overrides = [
        LayerScheme(match=names, bits=f.bits, group_size=f.group_size, symmetric=f.symmetric)
        for f, names in by_format.items()
        if f != own
    ]
    decoder = template.model_copy(update={"overrides": overrides, "exclude": kept})
    return [decoder, *stages]


# --------------------------------------------------------------------------- 4. walk


@dataclass(frozen=True)
class Candidate:
    """One allocation built and judged on the search windows."""

    index: int  # on the front
    bytes: int
    predicted_kl: float
    kl: float
    kl_upper: float | None
    perplexity_increase: float
    passed: bool
    outcomes: dict[str, str]
    kl_window_cv: float  # coefficient of variation of the per-window KL
    seconds: float
    formats: dict[str, int]  # format name → layer groups taking it
    judged_kl: float | None = None  # what the gate's rule compared with the KL budget


@dataclass(frozen=True)
class CandidateJob:
    recipe: Recipe
    index: int
    allocation: Allocation
    stages: list[QuantizeConfig]
    formats: dict[str, int]
    calibration: torch.Tensor | None
    windows: torch.Tensor


def build_candidate(
    model: nn.Module,
    stages: Sequence[QuantizeConfig],
    recipe: Recipe,
    calibration: torch.Tensor | None,
) -> nn.Module:
    candidate = copy.deepcopy(model)
    for stage in stages:
        handler = handler_for(stage)
        handler.preflight(candidate, stage)
        handler.apply(candidate, stage, stage_context(recipe, calibration))
    return candidate


def evaluate_candidate(
    model: nn.Module, baseline: BaselineLogProbs, job: CandidateJob
) -> Candidate:
    """Build the job's allocation from `model` and judge it by the gate's quality budgets,
    with the gate's rule, on the search windows."""
    start = time.perf_counter()
    built = build_candidate(model, job.stages, job.recipe, job.calibration)
    with dense_weights_for_scoring():
        quality = measure_quality(built, job.windows, baseline)
    del built
    gate = job.recipe.gate
    checks = [check for _, _, check in quality_checks(gate, quality)]
    results = dict(zip((c.name for c in checks), judge(checks, gate), strict=True))
    per_window = quality.per_window["kl"]
    mean = sum(per_window) / len(per_window)
    spread = (sum((k - mean) ** 2 for k in per_window) / max(len(per_window) - 1, 1)) ** 0.5
    return Candidate(
        index=job.index,
        bytes=job.allocation.bytes,
        predicted_kl=job.allocation.kl,
        kl=quality.kl_divergence,
        kl_upper=results["kl_divergence"].upper if "kl_divergence" in results else None,
        perplexity_increase=quality.perplexity / quality.baseline_perplexity - 1,
        passed=all(r.outcome == "ship" for r in results.values()),
        outcomes={name: r.outcome for name, r in results.items()},
        kl_window_cv=spread / mean if mean > 0 else 0.0,
        seconds=time.perf_counter() - start,
        formats=job.formats,
        judged_kl=_judged_kl(checks, results),
    )


def _judged_kl(checks: list[Check], results: dict[str, CheckResult]) -> float | None:
    """The KL statistic the gate's rule compared with the budget: the upper bound under
    non-inferiority, the estimate under the point rule."""
    check = next((c for c in checks if c.name == "kl_divergence"), None)
    if check is None:
        return None
    return check.estimate.center if check.rule == "point" else results[check.name].upper


def candidate_job(job: CandidateJob) -> Candidate:
    """One candidate, on a worker: the model reloaded from the recipe's source."""
    model = load_weights(resolve_source(job.recipe.model), job.recipe.dtype)
    baseline = baseline_logprobs(model, job.windows, batch_size=job.recipe.eval.batch_size)
    return evaluate_candidate(model, baseline, job)


def first_probe(front: Sequence[Allocation], recipe: Recipe) -> int:
    """The smallest allocation whose predicted KL is within the KL budget (the sums
    overestimate the KL of many changes at once, so this tends to pass); the front's middle
    when the gate has no KL budget."""
    limit = recipe.gate.quality.max_kl_divergence if recipe.gate.quality else None
    if limit is None:
        return len(front) // 2
    within = smallest_within(front, limit)
    return len(front) - 1 if within is None else front.index(within)


def walk(
    inputs: Inputs,
    recipe: Recipe,
    table: Sensitivity,
    front: list[Allocation],
    executor: Executor,
) -> list[Candidate]:
    config, template = _search_of(recipe)
    baseline = None
    if executor.in_process:
        baseline = baseline_logprobs(
            inputs.model, inputs.search_windows, batch_size=recipe.eval.batch_size
        )
    candidates: list[Candidate] = []

    def job(index: int) -> CandidateJob:
        formats = chosen_formats(table, front[index])
        counts: dict[str, int] = defaultdict(int)
        for fmt in formats:
            counts[fmt.name] += 1
        return CandidateJob(
            recipe=recipe,
            index=index,
            allocation=front[index],
            stages=allocation_stages(template, table.groups, formats),
            formats=dict(counts),
            calibration=inputs.prepared.calibration,
            windows=inputs.search_windows,
        )

    def judge_round(indices: list[int]) -> list[bool]:
        jobs = [job(i) for i in indices]
        if baseline is not None:
            results = [evaluate_candidate(inputs.model, baseline, j) for j in jobs]
        else:
            results = executor.map(candidate_job, jobs)
        for candidate in results:
            candidates.append(candidate)
            log.info(
                "search: candidate %d/%d, front point %d of %d: %.2f MB, predicted KL %.4f, "
                "measured %.4f → %s (%.0f s)",
                len(candidates),
                config.max_candidates,
                candidate.index,
                len(front),
                candidate.bytes / 1e6,
                candidate.predicted_kl,
                candidate.kl,
                "passes" if candidate.passed else "fails",
                candidate.seconds,
            )
        return [Probe(c.index, c.passed, c.judged_kl) for c in results]

    budget = recipe.gate.quality.max_kl_divergence if recipe.gate.quality else None
    walk_front(
        len(front),
        first_probe(front, recipe),
        judge_round,
        config.max_candidates,
        executor.parallelism,
        bisection if budget is None else predicted_guide([a.kl for a in front], budget),
    )
    return candidates


# --------------------------------------------------------------------------- 5. confirm


def summary(
    recipe: Recipe,
    table: Sensitivity,
    front: list[Allocation],
    candidates: list[Candidate],
    chosen: Candidate | None,
    false_ships: dict[str, Any],
    uniform: dict[str, int],
) -> dict[str, Any]:
    """What the report says about the search (sealed into the artifact's report.json)."""
    config = recipe.search
    assert config is not None
    step = max(1, len(front) // 64)
    return {
        "formats": config.formats,
        "groups": len(table.groups),
        "sensitivity": {
            "seconds": table.seconds,
            "rank_correlation_proxy": table.rank_correlation,
            "method": config.sensitivity,
            "dtype": config.sensitivity_dtype,
            "windows": config.sensitivity_samples,
            "seq_len": config.sensitivity_seq_len,
        },
        "front": [{"bytes": a.bytes, "predicted_kl": a.kl} for a in front[::step]],
        "front_size": len(front),
        "uniform_bytes": uniform,
        "candidates": [asdict(c) for c in candidates],
        "chosen": None if chosen is None else chosen.index,
        "allocation": None
        if chosen is None
        else {
            g.name: f.name
            for g, f in zip(table.groups, chosen_formats(table, front[chosen.index]), strict=True)
        },
        "false_ships": false_ships,
    }


def false_ship_rates(
    recipe: Recipe,
    front: list[Allocation],
    candidates: Sequence[Candidate],
    search_windows: int,
    parallelism: int,
) -> dict[str, Any]:
    """The procedure's simulated false-ship rates (procedure.simulate_false_ships): on this
    search's own profile (the front's predicted KLs scaled by the median measured / predicted
    ratio of the candidates, per-window spread as measured), and at the worst case for the
    final gate, every allocation's true KL just over the budget."""
    quality = recipe.gate.quality
    config = recipe.search
    assert quality is not None and config is not None and recipe.eval.quality is not None
    budget = quality.max_kl_divergence
    if budget is None or not candidates:
        return {}
    ratios = sorted(c.kl / c.predicted_kl for c in candidates if c.predicted_kl > 0)
    scale = ratios[len(ratios) // 2] if ratios else 1.0
    spread = sorted(c.kl_window_cv for c in candidates)[len(candidates) // 2]
    common = {
        "budget": budget,
        "confidence": recipe.gate.confidence,
        "rule": recipe.gate.rule_of(quality),
        "search_windows": search_windows,
        "confirm_windows": recipe.eval.quality.max_windows,
        "spread": spread,
        "max_candidates": config.max_candidates,
        "parallelism": parallelism,
    }
    first = first_probe(front, recipe)
    predicted = [a.kl for a in front]
    profile = simulate_false_ships(
        [kl * scale for kl in predicted], first=first, predicted=predicted, **common
    )
    worst = simulate_false_ships(
        [budget * 1.000001] * len(front), first=first, predicted=predicted, **common
    )
    return {
        **common,
        "profile": asdict(profile),
        "worst_case": asdict(worst),
        "profile_scale": scale,
    }


def uniform_sizes(model: nn.Module, table: Sensitivity) -> dict[str, int]:
    """Bytes of the searched layers with every decoder group in one format (where every one
    takes it) and the output layer, if searched, in 16 bits, as a uniform recipe stores them."""
    decoder = [(g, fs) for g, fs in zip(table.groups, table.formats, strict=True) if not g.output]
    head = sum(group_bytes(model, g, KEEP_16) for g in table.groups if g.output)
    sizes = {}
    for fmt in {f for _, fs in decoder for f in fs}:
        if all(fmt in fs for _, fs in decoder):
            sizes[fmt.name] = head + sum(group_bytes(model, g, fmt) for g, _ in decoder)
    return dict(sorted(sizes.items(), key=lambda item: item[1]))


def write_chosen_recipe(recipe: Recipe, stages: Sequence[QuantizeConfig], path: Path) -> Path:
    """The recipe `compress run` builds the chosen allocation from: the search's recipe with
    its quantize stage replaced and no `search` section."""
    data = recipe.to_dict()
    data.pop("search", None)
    data["stages"] = [
        {"type": stage.type, **stage.model_dump(mode="json", exclude_none=True)}  # type first
        for stage in stages
    ]
    atomic_write_text(path, yaml.safe_dump(data, sort_keys=False))
    load_recipe(path)  # what we wrote must be a valid recipe
    return path


@dataclass(frozen=True)
class SearchOutcome:
    exit_code: int
    verdict: str
    summary: dict[str, Any]
    run: RunOutcome | None


def search(
    recipe_path: str | Path, *, resume: bool = False, sign_key: bytes | None = None
) -> SearchOutcome:
    """Steps 1–4 (module docstring), then step 5 with `compress run`'s pipeline."""
    recipe = load_recipe(recipe_path)
    with naming_the_recipe(recipe_path):
        if recipe.search is None:
            raise RecipeError(
                "search: the recipe has no `search` section (recipes/search-int4.yaml shows one)"
            )
        config, template = _search_of(recipe)
        folder = search_dir(recipe)
        folder.mkdir(parents=True, exist_ok=True)
        inputs = load_inputs(recipe, config)
        handler_for(template).preflight(inputs.model, template)
        executor = executor_for(config.executor, config.ray)
        try:
            table = cached_sensitivity(
                inputs.model,
                inputs.sensitivity_windows,
                recipe,
                executor,
                sensitivity_key(recipe, inputs, config),
                folder / SENSITIVITY_CACHE,
                resume=resume,
                batch_size=recipe.eval.batch_size,
            )
            front = front_of(inputs.model, table, config.resolution)
            log.info("search: Pareto front of %d allocations", len(front))
            candidates = walk(inputs, recipe, table, front, executor)
        finally:
            executor.close()
        pick = smallest_passing([Probe(c.index, c.passed) for c in candidates])
        chosen = next((c for c in candidates if c.index == pick), None)
        report = summary(
            recipe,
            table,
            front,
            candidates,
            chosen,
            false_ship_rates(
                recipe, front, candidates, len(inputs.search_windows), executor.parallelism
            ),
            uniform_sizes(inputs.model, table),
        )
        atomic_write_json(folder / SEARCH_REPORT, report)
        if chosen is None:
            log.error(
                "search: none of %d candidates passed the gate's quality budgets on the "
                "search windows (the largest tried: %.2f MB); %s has every one",
                len(candidates),
                max(c.bytes for c in candidates) / 1e6,
                folder / SEARCH_REPORT,
            )
            return SearchOutcome(VERDICT_EXIT["reject"], "reject", report, None)
        stages = allocation_stages(
            template, table.groups, chosen_formats(table, front[chosen.index])
        )
        chosen_path = write_chosen_recipe(recipe, stages, folder / CHOSEN_RECIPE)
        del inputs
    log.info("search: confirming the chosen allocation with the gate: compress run %s", chosen_path)
    outcome = run_pipeline(chosen_path, sign_key=sign_key, annex={"search": report})
    return SearchOutcome(outcome.exit_code, outcome.verdict, report, outcome)
