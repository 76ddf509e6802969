"""The one flow: checks → model → preflight → baseline eval → stages → artifact → eval → gate.

Work in progress lives in `<output>/work/<name>/`:

    state.json          recipe fingerprint, completed stage records, whether the artifact is sealed
    checkpoint/         the model after the last completed stage (artifact format)
    artifact/           the sealed artifact, before it is judged
    eval/<task>.json    the artifact's scores (so an interrupted evaluation is not redone)

`--resume` picks up from there: completed stages are not redone, a sealed artifact is not
rewritten, scored tasks are not rescored. Baseline scores live in `<output>/cache/baseline/`,
keyed by the source's sha256 and the task configuration, and are shared by every run.
The judged artifact's verdict and report are sealed into its manifest, and only then, verified
in full, does it move to `<output>/release/<name>/` (ship), `<output>/rejected/<name>/`
(reject) or `<output>/inconclusive/<name>/`; the work directory is removed.

One run at a time writes a name: the whole run holds `<output>/work/<name>.lock`
(compress/lock.py). Everything that can be checked without the model's weights is checked
before they load (`prepare`, which is also `compress check`): the output directory, the
sources, the tokenizer's token counts of the calibration and held-out text, the task limits,
and every stage against the model's config (a weightless skeleton).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

import compress.stages  # noqa: F401  (fills the stage registry)
from compress.artifact import (
    REPORT,
    WEIGHTS,
    load_artifact,
    publish,
    read_manifest,
    save_artifact,
    seal_verdict,
)
from compress.calibration import (
    calibration_batches,
    calibration_device,
    check_calibration_source,
    check_text_source,
    describe_windows,
    evaluation_windows,
    load_text,
)
from compress.distill.parallel import STOP, DataParallel
from compress.distill.stage import serve_job
from compress.errors import VERDICT_EXIT, BadInputError, DataError
from compress.evaluate import lm_eval_runner
from compress.evaluate.gate import GateDecision, batch_of_look, decide, look_plan
from compress.evaluate.html import render_report_html
from compress.evaluate.lm_eval_runner import TaskResult
from compress.evaluate.model_card import render_model_card
from compress.evaluate.plots import write_loss_curves, write_search_plots
from compress.evaluate.quality import (
    BaselineLogProbs,
    QualityResult,
    baseline_logprobs,
    measure_quality,
)
from compress.evaluate.report import build_report, render_markdown
from compress.fileio import atomic_write_json, atomic_write_text, user_path
from compress.kernels import dense_weights_for_scoring
from compress.lock import artifact_lock
from compress.models import (
    ResolvedSource,
    fingerprint,
    load_model,
    load_tokenizer,
    load_weights,
    model_skeleton,
    resolve_source,
    source_license,
)
from compress.profiling import PeakMemory
from compress.quant.linear import QuantLinear
from compress.recipe import (
    EvalConfig,
    GateConfig,
    ModelConfig,
    QualityConfig,
    Recipe,
    SequentialConfig,
    TaskConfig,
    dump_recipe,
    load_recipe,
)
from compress.registry import StageContext, handler_for
from compress.seal import sealed, sign_manifest

log = logging.getLogger(__name__)

QUALITY_FIELD = "eval.quality.path"


@dataclass(frozen=True)
class RunOutcome:
    verdict: str
    exit_code: int
    artifact_dir: Path
    report: dict[str, Any]


@dataclass
class WorkState:
    """What survives a kill -9 (state.json)."""

    recipe_fingerprint: str
    stages: list[dict[str, Any]] = field(default_factory=list)
    artifact_sealed: bool = False

    @classmethod
    def load(cls, path: Path) -> WorkState:
        return cls(**json.loads(path.read_text(encoding="utf-8")))

    def save(self, path: Path) -> None:
        atomic_write_json(path, self.__dict__)


@dataclass(frozen=True)
class Layout:
    """Every path a run touches, derived from the recipe."""

    root: Path
    name: str

    @property
    def work(self) -> Path:
        return self.root / "work" / self.name

    @property
    def state(self) -> Path:
        return self.work / "state.json"

    @property
    def checkpoint(self) -> Path:
        return self.work / "checkpoint"

    @property
    def artifact(self) -> Path:
        return self.work / "artifact"

    def stage_work(self, index: int) -> Path:
        """In-stage checkpoints of stage `index` (e.g. distillation), kept for --resume."""
        return self.work / f"stage-{index}"

    def artifact_eval(self, task: str) -> Path:
        return self.work / "eval" / f"{task}.json"

    def baseline_cache(self, key: str) -> Path:
        return self.root / "cache" / "baseline" / f"{key}.json"

    def final(self, verdict: str) -> Path:
        folder = {"ship": "release", "reject": "rejected", "inconclusive": "inconclusive"}
        return self.root / folder[verdict] / self.name


# --------------------------------------------------------------------------- checks before work

OUTPUT_FIELD = "output.dir"
MIN_PAIRED_ITEMS = 2  # the gate pairs each task's items; an interval needs at least two


def output_root(recipe: Recipe) -> Path:
    return user_path(recipe.output.dir, field=OUTPUT_FIELD)


@contextlib.contextmanager
def naming_the_recipe(recipe_path: str | Path) -> Iterator[None]:
    """Bad input found after the recipe parsed is still the recipe's: say which file."""
    try:
        yield
    except BadInputError as exc:
        raise type(exc)(f"{recipe_path}: {exc}") from None


def check_output_dir(root: Path) -> None:
    """`output.dir` is (or can be made) a directory this process can write in."""
    if root.exists() and not root.is_dir():
        raise BadInputError(f"{OUTPUT_FIELD}: {root} exists and is not a directory")
    try:
        root.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=root, prefix=".compress-write-check.")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise BadInputError(
            f"{OUTPUT_FIELD}: cannot write in {root}: {exc.strerror or exc}"
        ) from None


def check_task_limits(recipe: Recipe) -> None:
    """Every task leaves the gate at least two items to pair (`limit` applies per subtask)."""
    for index, task in enumerate(recipe.eval.tasks):
        if task.limit is None:
            continue
        subtasks = lm_eval_runner.subtask_count(task.name)
        if task.limit * subtasks < MIN_PAIRED_ITEMS:
            raise BadInputError(
                f"eval.tasks[{index}].limit: {task.limit} item(s) per subtask × {subtasks} "
                f"subtask(s) of {task.name}; the gate pairs at least {MIN_PAIRED_ITEMS} items "
                "of every task"
            )


def check_inputs(recipe: Recipe) -> tuple[ResolvedSource, Path | None]:
    """The checks that need neither the model nor its tokenizer (fast, fail with a path)."""
    data_dir = lm_eval_runner.resolve_eval_data_dir(recipe.eval)
    lm_eval_runner.check_tasks(recipe.eval)
    check_task_limits(recipe)
    if recipe.calibration is not None:
        check_calibration_source(recipe.calibration)
    if recipe.eval.quality is not None:
        check_text_source(recipe.eval.quality.path, field=QUALITY_FIELD)
    teacher_sources(recipe)
    return resolve_source(recipe.model), data_dir


Plans = dict[str, tuple[list[str], list[int]]]  # task → (items in scoring order, look sizes)


@dataclass(frozen=True)
class Prepared:
    """What `prepare` established before any weight loads; the run goes on from it."""

    source: ResolvedSource
    data_dir: Path | None
    tokenizer: Any
    calibration: torch.Tensor | None  # (num_samples, seq_len), when a stage calibrates
    quality_windows: torch.Tensor | None  # (windows, seq_len) of held-out text
    plans: Plans  # the sequential gate's batches, per task (empty without one)


def prepare(recipe: Recipe) -> Prepared:
    """Everything that can be checked or built without the model's weights: the inputs, the
    tokenizer's view of the texts (enough tokens for the calibration windows, at least two
    held-out windows for a quality budget), and every stage against the model's skeleton
    (built from its config: group sizes against the real shapes)."""
    source, data_dir = check_inputs(recipe)
    tokenizer = load_tokenizer(source)
    preflight(model_skeleton(source, recipe.dtype), recipe)
    calibration = None
    if recipe.calibration is not None and any(s.needs_calibration for s in recipe.stages):
        calibration = calibration_batches(recipe.calibration, tokenizer)
    quality = quality_windows(recipe.eval.quality, tokenizer, gated=recipe.gate.quality is not None)
    plans = sequential_plans(recipe.eval, data_dir, recipe.gate)
    return Prepared(source, data_dir, tokenizer, calibration, quality, plans)


def check(recipe_path: str | Path) -> dict[str, Any]:
    """`compress check`: what `run` checks before the model's weights load, and nothing else."""
    recipe = load_recipe(recipe_path)
    with naming_the_recipe(recipe_path):
        check_output_dir(output_root(recipe))  # `run` checks it before taking its lock
        prepared = prepare(recipe)
    return {
        "recipe": recipe.name,
        "source": prepared.source.display,
        "calibration_windows": _rows(prepared.calibration),
        "quality_windows": _rows(prepared.quality_windows),
        "windows_start_with_bos": describe_windows(prepared.tokenizer)["starts_with_bos"],
        "ok": True,
    }


def _rows(windows: torch.Tensor | None) -> int | None:
    return None if windows is None else int(windows.shape[0])


def quality_windows(
    config: QualityConfig | None, tokenizer: Any, *, gated: bool
) -> torch.Tensor | None:
    """The held-out windows perplexity and KL are measured on; a gated quality budget needs
    two at least (its intervals are over windows)."""
    if config is None:
        return None
    text = load_text(config.path, field=QUALITY_FIELD)
    try:
        windows = evaluation_windows(text, tokenizer, config.seq_len, config.max_windows)
    except DataError as exc:
        raise DataError(f"{QUALITY_FIELD}: {config.path}: {exc}") from None
    if gated and windows.shape[0] < MIN_PAIRED_ITEMS:
        raise DataError(
            f"{QUALITY_FIELD}: {config.path} holds {windows.shape[0]} window(s) of "
            f"{config.seq_len} tokens; gate.quality's intervals need at least "
            f"{MIN_PAIRED_ITEMS} (lower eval.quality.seq_len or give a longer text)"
        )
    return windows


def preflight(model: nn.Module, recipe: Recipe) -> None:
    """Every stage validates itself before any stage runs.

    Each stage is checked against the model as the stages before it will leave it: a stage
    that changes shapes (prune) hands the next ones a weightless model of its planned shapes,
    so prune → quantize checks group sizes against the pruned widths.
    """
    planned = model
    for index, stage in enumerate(recipe.stages):
        handler = handler_for(stage)
        try:
            handler.preflight(planned, stage)
            if handler.plan is not None:
                planned = handler.plan(planned, stage)
        except BadInputError as exc:
            field = getattr(exc, "field", None)  # PreflightError names the setting at fault
            where = f"stages[{index}].{field}" if field else f"stages[{index}] ({stage.type})"
            raise type(exc)(f"{where}: {exc}") from None


# --------------------------------------------------------------------------- evaluation


def task_cache_key(
    source_sha: str,
    dtype: str,
    eval_cfg: EvalConfig,
    task: TaskConfig,
    sequential: SequentialConfig | None = None,
) -> str:
    """Baseline scores depend on the model bytes, dtype, task settings, batch size, seed and,
    for a sequential gate, the batches the items are scored in (few-shot draws follow them)."""
    identity = {
        "format": 2,  # 2: results carry prompt digests
        "source_sha256": source_sha,
        "dtype": dtype,
        "task": task.model_dump(mode="json"),
        "batch_size": eval_cfg.batch_size,
        "seed": eval_cfg.seed,
        "lm_eval": lm_eval_runner.lm_eval_version(),
        "sequential": None if sequential is None else sequential.model_dump(mode="json"),
    }
    canonical = json.dumps(identity, sort_keys=True).encode()
    return f"{task.name}-{hashlib.sha256(canonical).hexdigest()[:24]}"


def sequential_plans(eval_cfg: EvalConfig, data_dir: Path | None, gate: GateConfig) -> Plans:
    """Each task's sequential plan (listing its items reads the datasets, runs no model)."""
    if gate.sequential is None:
        return {}
    return {
        t.name: look_plan(lm_eval_runner.task_item_ids(t, data_dir), gate.sequential)
        for t in eval_cfg.tasks
    }


def score_look(
    model: nn.Module,
    tokenizer: Any,
    eval_cfg: EvalConfig,
    data_dir: Path | None,
    plans: Plans,
    task: TaskConfig,
    look: int,
) -> TaskResult:
    """Score the items look `look` (0-based) of the task's plan adds."""
    single = eval_cfg.model_copy(update={"tasks": [task]})
    batch = batch_of_look(plans[task.name], look)
    return lm_eval_runner.evaluate_tasks(
        model, tokenizer, single, data_dir=data_dir, selections={task.name: batch}
    )[task.name]


def evaluate_cached(
    model: nn.Module,
    tokenizer: Any,
    eval_cfg: EvalConfig,
    data_dir: Path | None,
    cache_path_of: dict[str, Path],
    label: str,
    plans: Plans | None = None,
) -> tuple[dict[str, TaskResult], bool]:
    """Score every task, reading and writing one JSON per task; returns (results, all cached).

    With sequential `plans`, every look's batch is scored (in order), so the result pairs
    with an artifact stopped at any look."""
    results: dict[str, TaskResult] = {}
    for task in eval_cfg.tasks:
        path = cache_path_of[task.name]
        if path.is_file():
            results[task.name] = TaskResult.from_dict(json.loads(path.read_text(encoding="utf-8")))
            log.info("%s %s: cached (%s)", label, task.name, path)
    todo = [t for t in eval_cfg.tasks if t.name not in results]
    if todo:
        log.info("%s: scoring %s", label, ", ".join(t.name for t in todo))
        if plans:
            fresh = {}
            for task in todo:
                batches = [
                    score_look(model, tokenizer, eval_cfg, data_dir, plans, task, look)
                    for look in range(len(plans[task.name][1]))
                ]
                fresh[task.name] = functools.reduce(TaskResult.merged_with, batches)
        else:
            fresh = lm_eval_runner.evaluate_tasks(
                model, tokenizer, eval_cfg.model_copy(update={"tasks": todo}), data_dir=data_dir
            )
        for name, result in fresh.items():
            atomic_write_json(cache_path_of[name], result.to_dict())
        results.update(fresh)
    return {t.name: results[t.name] for t in eval_cfg.tasks}, not todo


def evaluate_sequentially(
    model: nn.Module,
    tokenizer: Any,
    recipe: Recipe,
    data_dir: Path | None,
    plans: Plans,
    baseline: dict[str, TaskResult],
    quality: QualityResult | None,
    cache_path_of: dict[str, Path],
) -> dict[str, TaskResult]:
    """Score the artifact look by look, each task until its verdict is decided (or its items
    run out), the whole run until the gate's verdict is; every look is saved for --resume."""
    results: dict[str, TaskResult] = {}
    for task in recipe.eval.tasks:
        path = cache_path_of[task.name]
        if path.is_file():
            results[task.name] = TaskResult.from_dict(json.loads(path.read_text(encoding="utf-8")))
    tasks = {t.name: t for t in recipe.eval.tasks}
    pending = [name for name in tasks if name not in results]
    while True:
        for name in pending:
            looks_done = len(results[name].info["prompt_digests"]) if name in results else 0
            log.info("artifact %s: look %d", name, looks_done + 1)
            batch = score_look(
                model, tokenizer, recipe.eval, data_dir, plans, tasks[name], looks_done
            )
            results[name] = results[name].merged_with(batch) if name in results else batch
            atomic_write_json(cache_path_of[name], results[name].to_dict())
        decision = decide(baseline, results, recipe.gate, quality)
        assert decision.sequential is not None
        if decision.verdict != "continue":
            log.info(
                "sequential gate: %s after %d of %d artifact items",
                decision.verdict,
                decision.sequential["items_used"],
                decision.sequential["items_planned"],
            )
            return results
        states = decision.sequential["tasks"]
        pending = [n for n in tasks if states[n]["outcome"] == "continue"]


# --------------------------------------------------------------------------- stages


def stage_context(
    recipe: Recipe,
    calibration: torch.Tensor | None,
    teacher: Callable[[str | None], nn.Module] | None = None,
    parallel: DataParallel | None = None,
) -> StageContext:
    if calibration is None or recipe.calibration is None:
        return StageContext(dtype=recipe.dtype, teacher=teacher, parallel=parallel)
    return StageContext(
        dtype=recipe.dtype,
        calibration_windows=lambda: calibration,
        calibration_batch_size=recipe.calibration.batch_size,
        calibration_device=calibration_device(recipe.calibration.device),
        teacher=teacher,
        parallel=parallel,
    )


def run_stages(
    model: nn.Module,
    calibration: torch.Tensor | None,
    recipe: Recipe,
    layout: Layout,
    state: WorkState,
    teacher: Callable[[str | None], nn.Module] | None = None,
    parallel: DataParallel | None = None,
) -> nn.Module:
    """Run the stages not yet completed, checkpointing after each one."""
    context = stage_context(recipe, calibration, teacher, parallel)
    for index in range(len(state.stages), len(recipe.stages)):
        stage = recipe.stages[index]
        log.info("stage %d/%d: %s", index + 1, len(recipe.stages), stage.type)
        start = time.perf_counter()
        stage_work = dataclasses.replace(context, work_dir=layout.stage_work(index))
        with PeakMemory() as memory:
            result = handler_for(stage).apply(model, stage, stage_work)
        seconds = time.perf_counter() - start
        save_artifact(
            model,
            None,  # checkpoints hold weights only; on resume the tokenizer comes from the source
            layout.checkpoint,
            recipe_yaml=dump_recipe(recipe),
            manifest_fields={"dtype": recipe.dtype, "checkpoint_after_stage": index},
        )
        state.stages.append(
            {
                "index": index,
                "type": stage.type,
                "summary": result.summary,
                "details": result.details,
                "seconds": seconds,
                "memory": memory.result.to_dict(),
            }
        )
        state.save(layout.state)
        shutil.rmtree(layout.stage_work(index), ignore_errors=True)  # superseded by checkpoint/
        log.info("stage %d done in %.1f s: %s", index + 1, seconds, result.summary)
    return model


# --------------------------------------------------------------------------- the run


def _sizes(model_artifact: Path, stages: list[dict[str, Any]], dtype: str) -> dict[str, Any]:
    before = sum(s["details"].get("bytes_before", 0) for s in stages if s["type"] == "quantize")
    after = sum(s["details"].get("bytes_after", 0) for s in stages if s["type"] == "quantize")
    return {
        "artifact_bytes": sum(p.stat().st_size for p in model_artifact.iterdir() if p.is_file()),
        "weights_bytes": (model_artifact / WEIGHTS).stat().st_size,
        "source_dtype": dtype,
        "quantized_layers_bytes_before": before,
        "quantized_layers_bytes_after": after,
        "quantized_layers_ratio": after / before if before else None,
    }


def run(
    recipe_path: str | Path,
    *,
    resume: bool = False,
    parallel: DataParallel | None = None,
    wait: bool = False,
    sign_key: bytes | None = None,
    annex: dict[str, Any] | None = None,
) -> RunOutcome:
    """The whole flow, on one process or as rank 0 of a data-parallel launch (`parallel`),
    whose workers run `serve_distillation` meanwhile. Holds the artifact name's lock from
    before any work until the verdict is published (`wait`: for another run holding it).
    `annex`: sections another command adds to the sealed report (`compress search`'s)."""
    recipe = load_recipe(recipe_path)
    with naming_the_recipe(recipe_path):
        layout = Layout(output_root(recipe), recipe.name)
        check_output_dir(layout.root)
        with artifact_lock(layout.root, recipe.name, wait=wait):
            return _run_locked(recipe, layout, resume, parallel, sign_key, annex or {})


class _Clock:
    """Seconds per named step of the run, for the report."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.steps: dict[str, float] = {}

    @contextlib.contextmanager
    def step(self, name: str):
        t = time.perf_counter()
        yield
        self.steps[name] = self.steps.get(name, 0.0) + time.perf_counter() - t

    def total(self) -> dict[str, float]:
        return {**self.steps, "total": time.perf_counter() - self.start}


def _run_locked(
    recipe: Recipe,
    layout: Layout,
    resume: bool,
    parallel: DataParallel | None,
    sign_key: bytes | None,
    annex: dict[str, Any],
) -> RunOutcome:
    clock = _Clock()
    with clock.step("load + preflight"):
        prepared = prepare(recipe)
        state = _open_work(layout, recipe, resume)
        source_sha = fingerprint(prepared.source)
        model = load_weights(prepared.source, recipe.dtype)
    with clock.step("baseline eval"):
        baseline = score_baseline(model, recipe, prepared, layout, source_sha)
    with clock.step("stages + save"):
        if not state.artifact_sealed:
            if state.stages:
                log.info("resuming after stage %d from %s", len(state.stages), layout.checkpoint)
                del model  # before the checkpoint loads: one model in memory at a time
                model, _ = load_artifact(layout.checkpoint, with_tokenizer=False)
            teacher = teacher_loader(recipe, prepared.source)
            model = run_stages(
                model, prepared.calibration, recipe, layout, state, teacher, parallel
            )
            seal_artifact(model, prepared.tokenizer, recipe, layout, state, source_sha)
        del model
    with clock.step("artifact eval"):
        scores, quality = score_artifact(recipe, prepared, layout, baseline)
    decision = decide(baseline.tasks, scores, recipe.gate, quality)
    report = write_report(
        recipe,
        prepared,
        layout,
        state,
        baseline,
        scores,
        quality,
        decision,
        {"display": prepared.source.display, "sha256": source_sha},
        clock.total(),
        annex,
    )
    final = seal_and_publish(layout, decision, sign_key)
    log.info("%s → %s\n%s", decision.verdict.upper(), final, render_markdown(report))
    return RunOutcome(
        verdict=decision.verdict,
        exit_code=VERDICT_EXIT[decision.verdict],
        artifact_dir=final,
        report=report,
    )


@dataclass(frozen=True)
class BaselineScores:
    quality: BaselineLogProbs | None  # the baseline's side of perplexity / KL
    tasks: dict[str, TaskResult]
    cached: bool  # every task came from the cache


def score_baseline(
    model: nn.Module, recipe: Recipe, prepared: Prepared, layout: Layout, source_sha: str
) -> BaselineScores:
    """The uncompressed model's scores, taken before any stage changes it (cached per task)."""
    quality = capture_quality_baseline(model, prepared.quality_windows)
    paths = {
        task.name: layout.baseline_cache(
            task_cache_key(source_sha, recipe.dtype, recipe.eval, task, recipe.gate.sequential)
        )
        for task in recipe.eval.tasks
    }
    tasks, cached = evaluate_cached(
        model, prepared.tokenizer, recipe.eval, prepared.data_dir, paths, "baseline", prepared.plans
    )
    return BaselineScores(quality, tasks, cached)


def seal_artifact(
    model: nn.Module,
    tokenizer: Any,
    recipe: Recipe,
    layout: Layout,
    state: WorkState,
    source_sha: str,
) -> None:
    """Write the compressed model as a sealed artifact in the work directory."""
    save_artifact(
        model,
        tokenizer,
        layout.artifact,
        recipe_yaml=dump_recipe(recipe),
        manifest_fields={
            "recipe_name": recipe.name,
            "recipe_fingerprint": recipe.fingerprint(),
            "source": {"spec": recipe.model.source, "sha256": source_sha},
            "dtype": recipe.dtype,
            "seed": recipe.eval.seed,
            "stages": state.stages,
        },
    )
    state.artifact_sealed = True
    state.save(layout.state)
    shutil.rmtree(layout.checkpoint, ignore_errors=True)


def score_artifact(
    recipe: Recipe, prepared: Prepared, layout: Layout, baseline: BaselineScores
) -> tuple[dict[str, TaskResult], QualityResult | None]:
    """The artifact as loaded from disk (verified), scored like the baseline."""
    model, tokenizer = load_artifact(layout.artifact)
    _log_quantized(model)
    # load_artifact has just verified every hash against the manifest: reuse, do not rehash.
    weights_sha = read_manifest(layout.artifact)["files"][WEIGHTS]["sha256"]
    paths = {task.name: layout.artifact_eval(task.name) for task in recipe.eval.tasks}
    _discard_stale_artifact_scores(paths, weights_sha, layout)
    with dense_weights_for_scoring():  # prefill at the baseline's speed (kernels.py)
        quality = (
            None
            if baseline.quality is None
            else measure_quality(model, baseline.quality.windows, baseline.quality)
        )
        if prepared.plans:
            scores = evaluate_sequentially(
                model,
                tokenizer,
                recipe,
                prepared.data_dir,
                prepared.plans,
                baseline.tasks,
                quality,
                paths,
            )
        else:
            scores, _ = evaluate_cached(
                model, tokenizer, recipe.eval, prepared.data_dir, paths, "artifact"
            )
    return scores, quality


def write_report(
    recipe: Recipe,
    prepared: Prepared,
    layout: Layout,
    state: WorkState,
    baseline: BaselineScores,
    scores: dict[str, TaskResult],
    quality: QualityResult | None,
    decision: GateDecision,
    source: dict[str, str],
    timings: dict[str, float],
    annex: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """report.json (sealed: compress gate --replay checks it) and its renderings beside the
    artifact; a rendering that fails is logged and noted, never the verdict's undoing."""
    report = build_report(
        recipe_name=recipe.name,
        decision=decision,
        stages=state.stages,
        sizes=_sizes(layout.artifact, state.stages, recipe.dtype),
        timings=timings,
        evaluation={
            "lm_eval_version": lm_eval_runner.lm_eval_version(),
            "data_source": str(prepared.data_dir) if prepared.data_dir else "hub",
            "baseline_cached": baseline.cached,
            "windows": describe_windows(prepared.tokenizer),
            "baseline": {k: v.to_dict() for k, v in baseline.tasks.items()},
            "artifact": {k: v.to_dict() for k, v in scores.items()},
        },
        source=source,
        quality=None if quality is None else quality.to_dict(),
        gate_config=recipe.gate.model_dump(mode="json"),
    )
    report["plots"] = write_loss_curves(state.stages, layout.artifact)
    report.update(annex or {})
    if report.get("search"):
        report["plots"] += write_search_plots(report["search"], layout.artifact)
    report = sealed(report)
    atomic_write_json(layout.artifact / REPORT, report)
    directory = layout.artifact
    _write_rendering(directory / "report.md", lambda: render_markdown(report))
    _write_rendering(directory / "report.html", lambda: render_report_html(report, directory))
    license_name = source_license(prepared.source)
    hub_id = prepared.source.location if prepared.source.kind == "hub" else None
    _write_rendering(
        directory / "README.md",
        lambda: render_model_card(report, dump_recipe(recipe), license_name, hub_id),
    )
    return report


def _write_rendering(path: Path, render: Callable[[], str]) -> None:
    """A human view of report.json. The decision is already made and stored; a bug in a view
    must not turn a verdict into an internal failure, so it is logged and noted instead."""
    try:
        text = render()
    except Exception:
        log.exception("could not render %s; report.json holds the full report", path.name)
        text = f"{path.name} could not be rendered; report.json holds the full report.\n"
    atomic_write_text(path, text)


def seal_and_publish(layout: Layout, decision: GateDecision, sign_key: bytes | None) -> Path:
    """Seal the verdict and the report into the manifest (and sign it), move the verified
    artifact into its verdict folder, and clear what this name left elsewhere."""
    verdict = decision.verdict
    seal_verdict(
        layout.artifact,
        {
            "verdict": verdict,
            "exit_code": VERDICT_EXIT[verdict],
            "report": REPORT,
            "decided": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        },
    )
    if sign_key is not None:
        sign_manifest(layout.artifact, sign_key)
    final = layout.final(verdict)
    publish(layout.artifact, final, key=sign_key)
    for other in VERDICT_EXIT:  # a stale verdict from an earlier run would mislead
        if other != verdict:
            shutil.rmtree(layout.final(other), ignore_errors=True)
    shutil.rmtree(layout.work, ignore_errors=True)
    return final


def serve_distillation(recipe_path: str | Path, parallel: DataParallel) -> None:
    """A worker rank of a data-parallel launch: train each distill stage's share in step with
    rank 0 until it says stop. Writes nothing."""
    recipe = load_recipe(recipe_path)
    resolved, _ = check_inputs(recipe)
    teacher_of = teacher_loader(recipe, resolved)
    while (message := parallel.receive_message())["op"] != STOP:
        serve_job(message, teacher_of, parallel)
    log.info("rank %d: rank 0 is done", parallel.rank)


def teacher_sources(recipe: Recipe) -> dict[str, ResolvedSource]:
    """Every teacher a distill stage names, resolved (fails fast on a missing path)."""
    named = {s.teacher for s in recipe.stages if getattr(s, "teacher", None) is not None}
    common = {"revision": None, "trust_remote_code": recipe.model.trust_remote_code}
    return {spec: resolve_source(ModelConfig(source=spec, **common)) for spec in sorted(named)}


def teacher_loader(recipe: Recipe, source: ResolvedSource) -> Callable[[str | None], nn.Module]:
    """Load the teacher when a stage asks for it: the source itself, or a named model. Not
    cached: the teacher is freed when its stage ends."""
    named = teacher_sources(recipe)

    def load(spec: str | None) -> nn.Module:
        resolved = source if spec is None else named[spec]
        log.info("loading the distillation teacher from %s", resolved.display)
        return load_model(resolved, recipe.dtype)[0]

    return load


def capture_quality_baseline(
    model: nn.Module, windows: torch.Tensor | None
) -> BaselineLogProbs | None:
    """The baseline's side of perplexity / KL, taken before any stage changes the model."""
    return None if windows is None else baseline_logprobs(model, windows)


def _open_work(layout: Layout, recipe: Recipe, resume: bool) -> WorkState:
    fingerprint_now = recipe.fingerprint()
    if resume and layout.state.is_file():
        state = WorkState.load(layout.state)
        if state.recipe_fingerprint != fingerprint_now:
            raise BadInputError(
                f"--resume: {layout.work} was started from a different recipe; "
                "run without --resume to start over"
            )
        log.info("resuming %s: %d stage(s) done", layout.work, len(state.stages))
        return state
    if resume:
        log.info("--resume: nothing to resume in %s; starting fresh", layout.work)
    elif layout.work.exists():
        log.info("discarding unfinished work in %s (use --resume to continue it)", layout.work)
        shutil.rmtree(layout.work)
    state = WorkState(recipe_fingerprint=fingerprint_now)
    state.save(layout.state)
    return state


def _discard_stale_artifact_scores(
    paths: dict[str, Path], weights_sha: str, layout: Layout
) -> None:
    """Artifact scores are only reused for the very same weights."""
    marker = layout.work / "eval" / "weights.sha256"
    if marker.is_file() and marker.read_text().strip() == weights_sha:
        return
    for path in paths.values():
        path.unlink(missing_ok=True)
    atomic_write_text(marker, weights_sha + "\n")


def _log_quantized(model: nn.Module) -> None:
    count = sum(isinstance(m, QuantLinear) for m in model.modules())
    log.info("artifact loaded from disk for evaluation: %d quantized Linear layers", count)
