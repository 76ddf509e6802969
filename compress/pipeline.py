"""The one flow: checks → model → preflight → baseline eval → stages → artifact → eval → gate.

Work in progress lives in `<output>/work/<name>/`:

    state.json          recipe fingerprint, completed stage records, whether the artifact is sealed
    checkpoint/         the model after the last completed stage (artifact format)
    artifact/           the sealed artifact, before it is judged
    eval/<task>.json    the artifact's scores (so an interrupted evaluation is not redone)

`--resume` picks up from there: completed stages are not redone, a sealed artifact is not
rewritten, scored tasks are not rescored. Baseline scores live in `<output>/cache/baseline/`,
keyed by the source's sha256 and the task configuration, and are shared by every run.
The judged artifact finally moves, atomically, to `<output>/release/<name>/` (ship) or
`<output>/rejected/<name>/` (reject), and the work directory is removed.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

import compress.stages  # noqa: F401  (fills the stage registry)
from compress.artifact import WEIGHTS, load_artifact, read_manifest, save_artifact
from compress.calibration import (
    calibration_batches,
    calibration_device,
    check_calibration_source,
    check_text_source,
    evaluation_windows,
    load_text,
)
from compress.distill.parallel import STOP, DataParallel
from compress.distill.stage import serve_job
from compress.errors import VERDICT_EXIT, BadInputError
from compress.evaluate import lm_eval_runner
from compress.evaluate.gate import batch_of_look, decide, look_plan
from compress.evaluate.html import render_report_html
from compress.evaluate.lm_eval_runner import TaskResult
from compress.evaluate.model_card import render_model_card
from compress.evaluate.plots import write_loss_curves
from compress.evaluate.quality import (
    BaselineLogProbs,
    QualityResult,
    baseline_logprobs,
    measure_quality,
)
from compress.evaluate.report import build_report, render_markdown
from compress.fileio import atomic_write_json, atomic_write_text, replace_dir
from compress.models import (
    ResolvedSource,
    fingerprint,
    load_model,
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


def check_inputs(recipe: Recipe) -> tuple[ResolvedSource, Path | None]:
    """Everything that can be checked without loading the model (fast, fails with a path)."""
    data_dir = lm_eval_runner.resolve_eval_data_dir(recipe.eval)
    lm_eval_runner.check_tasks(recipe.eval)
    if recipe.calibration is not None:
        check_calibration_source(recipe.calibration)
    if recipe.eval.quality is not None:
        check_text_source(recipe.eval.quality.path, field=QUALITY_FIELD)
    teacher_sources(recipe)
    return resolve_source(recipe.model), data_dir


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
            raise type(exc)(f"stages[{index}] ({stage.type}): {exc}") from None


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


Plans = dict[str, tuple[list[str], list[int]]]  # task → (items in scoring order, look sizes)


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
    tokenizer: Any,
    teacher: Callable[[str | None], nn.Module] | None = None,
    parallel: DataParallel | None = None,
) -> StageContext:
    calibration = recipe.calibration
    if calibration is None:
        return StageContext(dtype=recipe.dtype, teacher=teacher, parallel=parallel)
    return StageContext(
        dtype=recipe.dtype,
        calibration_windows=functools.cache(lambda: calibration_batches(calibration, tokenizer)),
        calibration_batch_size=calibration.batch_size,
        calibration_device=calibration_device(calibration.device),
        teacher=teacher,
        parallel=parallel,
    )


def run_stages(
    model: nn.Module,
    tokenizer: Any,
    recipe: Recipe,
    layout: Layout,
    state: WorkState,
    teacher: Callable[[str | None], nn.Module] | None = None,
    parallel: DataParallel | None = None,
) -> nn.Module:
    """Run the stages not yet completed, checkpointing after each one."""
    context = stage_context(recipe, tokenizer, teacher, parallel)
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
    recipe_path: str | Path, *, resume: bool = False, parallel: DataParallel | None = None
) -> RunOutcome:
    """The whole flow, on one process or as rank 0 of a data-parallel launch (`parallel`),
    whose workers run `serve_distillation` meanwhile."""
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    recipe = load_recipe(recipe_path)
    resolved, data_dir = check_inputs(recipe)
    layout = Layout(Path(recipe.output.dir), recipe.name)

    state = _open_work(layout, recipe, resume)
    t = time.perf_counter()
    source_sha = fingerprint(resolved)
    model, tokenizer = load_model(resolved, recipe.dtype)
    preflight(model, recipe)
    timings["load + preflight"] = time.perf_counter() - t

    t = time.perf_counter()
    quality_baseline = capture_quality_baseline(model, tokenizer, recipe.eval.quality)
    baseline_paths = {
        task.name: layout.baseline_cache(
            task_cache_key(source_sha, recipe.dtype, recipe.eval, task, recipe.gate.sequential)
        )
        for task in recipe.eval.tasks
    }
    plans = sequential_plans(recipe.eval, data_dir, recipe.gate)
    baseline, baseline_cached = evaluate_cached(
        model, tokenizer, recipe.eval, data_dir, baseline_paths, "baseline", plans
    )
    timings["baseline eval"] = time.perf_counter() - t

    t = time.perf_counter()
    if not state.artifact_sealed:
        if state.stages:
            log.info("resuming after stage %d from %s", len(state.stages), layout.checkpoint)
            del model
            model, _ = load_artifact(layout.checkpoint, with_tokenizer=False)
        model = run_stages(
            model, tokenizer, recipe, layout, state, teacher_loader(recipe, resolved), parallel
        )
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
    del model
    timings["stages + save"] = time.perf_counter() - t

    t = time.perf_counter()
    artifact_model, artifact_tokenizer = load_artifact(layout.artifact)
    _log_quantized(artifact_model)
    # load_artifact has just verified every hash against the manifest: reuse, do not rehash.
    weights_sha = read_manifest(layout.artifact)["files"][WEIGHTS]["sha256"]
    artifact_paths = {task.name: layout.artifact_eval(task.name) for task in recipe.eval.tasks}
    _discard_stale_artifact_scores(artifact_paths, weights_sha, layout)
    quality = (
        None
        if quality_baseline is None
        else measure_quality(artifact_model, quality_baseline.windows, quality_baseline)
    )
    if plans:
        artifact_scores = evaluate_sequentially(
            artifact_model,
            artifact_tokenizer,
            recipe,
            data_dir,
            plans,
            baseline,
            quality,
            artifact_paths,
        )
    else:
        artifact_scores, _ = evaluate_cached(
            artifact_model, artifact_tokenizer, recipe.eval, data_dir, artifact_paths, "artifact"
        )
    timings["artifact eval"] = time.perf_counter() - t

    decision = decide(baseline, artifact_scores, recipe.gate, quality)
    timings["total"] = time.perf_counter() - t_start
    report = build_report(
        recipe_name=recipe.name,
        decision=decision,
        stages=state.stages,
        sizes=_sizes(layout.artifact, state.stages, recipe.dtype),
        timings=timings,
        evaluation={
            "lm_eval_version": lm_eval_runner.lm_eval_version(),
            "data_source": str(data_dir) if data_dir else "hub",
            "baseline_cached": baseline_cached,
            "baseline": {k: v.to_dict() for k, v in baseline.items()},
            "artifact": {k: v.to_dict() for k, v in artifact_scores.items()},
        },
        source={"display": resolved.display, "sha256": source_sha},
        quality=None if quality is None else quality.to_dict(),
        gate_config=recipe.gate.model_dump(mode="json"),
    )
    report["plots"] = write_loss_curves(state.stages, layout.artifact)
    atomic_write_json(layout.artifact / "report.json", report)
    atomic_write_text(layout.artifact / "report.md", render_markdown(report))
    atomic_write_text(layout.artifact / "report.html", render_report_html(report, layout.artifact))
    atomic_write_text(
        layout.artifact / "README.md",
        render_model_card(
            report,
            dump_recipe(recipe),
            source_license(resolved),
            resolved.location if resolved.kind == "hub" else None,
        ),
    )

    final = layout.final(decision.verdict)
    replace_dir(layout.artifact, final)
    for verdict in VERDICT_EXIT:  # a stale verdict from an earlier run would mislead
        if verdict != decision.verdict:
            shutil.rmtree(layout.final(verdict), ignore_errors=True)
    shutil.rmtree(layout.work, ignore_errors=True)
    log.info("%s → %s\n%s", decision.verdict.upper(), final, render_markdown(report))
    return RunOutcome(
        verdict=decision.verdict,
        exit_code=VERDICT_EXIT[decision.verdict],
        artifact_dir=final,
        report=report,
    )


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
    model: nn.Module, tokenizer: Any, config: QualityConfig | None
) -> BaselineLogProbs | None:
    """The baseline's side of perplexity / KL, taken before any stage changes the model."""
    if config is None:
        return None
    text = load_text(config.path, field=QUALITY_FIELD)
    windows = evaluation_windows(text, tokenizer, config.seq_len, config.max_windows)
    return baseline_logprobs(model, windows)


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
