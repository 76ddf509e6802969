"""Run lm-eval's stock tasks (`mmlu`, `gsm8k`, any registered name) over an in-memory model.

What comes back, per recipe task, is a `TaskResult`: the aggregate score the gate compares AND
every item's score, keyed by a stable id (`<subtask>/<doc_id>`), so the gate can pair baseline
and artifact item by item.

Task definitions are lm-eval's own, untouched: prompts, few-shot splits, filters and metrics
are exactly what `lm-eval run --tasks mmlu` uses, so our numbers are comparable with anyone
else's lm-eval numbers at the same settings. The only thing we change is *where the data
comes from*, and only when a local data directory is given (recipe `eval.data_dir` or
`$COMPRESS_EVAL_DATA_DIR`): that directory holds copies of Hub datasets laid out as
`<data_dir>/<org>/<name>` (e.g. `<data_dir>/cais/mmlu/<subject>/test-*.parquet`), and each
(sub)task's `dataset_path` (`cais/mmlu`) is pointed at `<data_dir>/cais/mmlu`.

How the redirect is done, and why this way (lm-eval 0.4.13):

- We write a tiny *wrapper group* YAML per recipe task into a temporary directory and index it
  with `TaskManager(include_path=...)` - lm-eval's documented way to add task definitions:

      group: compress_local__mmlu
      task:
        - group: mmlu                                   # the stock, registered group
          dataset_path: /data/hf/cais/mmlu              # override applied to every leaf

  lm-eval's own factory then builds the stock group with the override merged into every
  subtask's config *before* the subtask loads its data (a `ConfigurableTask` downloads in its
  constructor, so patching built tasks afterwards is too late).
- The obvious public alternatives are broken in 0.4.13: a dict spec passed to
  `TaskManager.load` / `get_task_dict` (`{"task": "gsm8k", "dataset_path": ...}`) no longer
  inherits the registered task's config (only the dict's own keys are used); a top-level
  inline *group* dict leaks its own `task:` list into its members' configs (crash); a group
  YAML passed as a file path is named after its `task:` list (crash). Hence the indexed file.
- Cost: indexing all of lm-eval's ~14k task YAMLs takes ~7 s on 2 cores. It is paid once per
  process for name checks (`check_tasks`) and once per (data_dir, task set) for the wrapper
  index; both are cached.
- Without a data directory nothing is rewritten: the stock names go to lm-eval, which fetches
  from the Hub as usual.

The repository's `eval/README.md` explains the same mechanism for people running the lm-eval
CLI against the shared data; no YAML has to live in the repo (the local path is only known at
run time), which also keeps a non-editable install working.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import logging
import math
import os
import random
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from compress.errors import BadInputError, DataError
from compress.fileio import user_path
from compress.recipe import ENV_EVAL_DATA_DIR, EvalConfig, TaskConfig

if TYPE_CHECKING:
    from lm_eval.tasks import TaskManager

logger = logging.getLogger(__name__)

HUB_SOURCE = "hub"
WRAPPER_PREFIX = "compress_local__"
NO_FILTER = "none"  # lm-eval's filter name when a task defines no filter_list

# Default gating metric per task when TaskConfig.metric is None. Metric names are lm-eval's
# `metric` or `metric,filter` (the filter is left out when it is lm-eval's "none").
PRIMARY_METRICS: dict[str, str] = {
    # The stock mmlu tasks define only `acc` (loglikelihood of the letters A-D).
    "mmlu": "acc",
    # gsm8k defines exact_match under two filters. "strict-match" needs the model to write
    # "#### <answer>"; small or compressed models (and generations cut short by max_gen_toks)
    # rarely do, so it sits near 0 for every model and cannot see a regression.
    # "flexible-extract" takes the last number in the completion, which tracks arithmetic
    # ability instead of format compliance - the thing compression can damage.
    "gsm8k": "exact_match,flexible-extract",
}

# Environment variables that put huggingface_hub / datasets offline.
_OFFLINE_ENV = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
_GROUP_KEYS = frozenset({"group", "group_alias", "task", "aggregate_metric_list", "metadata"})


# ----------------------------------------------------------------------------- results


@dataclass(frozen=True)
class TaskResult:
    """One recipe task's score on one model.

    `value` is the plain mean of the per-item scores in `items`. For a group such as `mmlu`
    that is the mean over ALL items of all its subtasks (every item weighs the same), which
    equals lm-eval's size-weighted group aggregate - not the mean of per-subject means.
    Item ids are `<subtask>/<doc_id>` (e.g. `mmlu_anatomy/12`, `gsm8k/0`): stable across
    runs and models at the same limit, so baseline and artifact can be paired item by item.
    """

    task: str
    metric: str
    value: float
    num_items: int
    items: dict[str, float]
    info: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "metric": self.metric,
            "value": self.value,
            "num_items": self.num_items,
            "items": dict(self.items),
            "info": self.info,
        }

    def merged_with(self, later: TaskResult) -> TaskResult:
        """This result and a later batch of other items of the same task, as one result (the
        run info of the first, with the batches' prompt digests in order)."""
        overlap = sorted(set(self.items) & set(later.items))[:3]
        if overlap or later.metric != self.metric:
            raise BadInputError(f"{self.task}: batches overlap ({overlap}) or differ in metric")
        digests = self.info.get("prompt_digests", []) + later.info.get("prompt_digests", [])
        return self._with_items({**self.items, **later.items}, digests)

    def restricted_to(self, item_ids: list[str], batches: int) -> TaskResult:
        """The result on `item_ids` only, scored in its first `batches` batches."""
        missing = sorted(set(item_ids) - set(self.items))[:3]
        if missing:
            raise BadInputError(f"{self.task}: items {missing} were not scored")
        digests = self.info.get("prompt_digests", [])[:batches]
        return self._with_items({k: self.items[k] for k in item_ids}, digests)

    def _with_items(self, items: dict[str, float], digests: list[str]) -> TaskResult:
        return TaskResult(
            task=self.task,
            metric=self.metric,
            value=math.fsum(items.values()) / len(items),
            num_items=len(items),
            items=items,
            info={**self.info, "prompt_digests": digests},
        )

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TaskResult:
        missing = sorted({"task", "metric", "value", "num_items", "items"} - set(d))
        if missing:
            raise BadInputError(f"not a TaskResult: missing keys {missing}")
        return cls(
            task=str(d["task"]),
            metric=str(d["metric"]),
            value=float(d["value"]),
            num_items=int(d["num_items"]),
            items={str(k): float(v) for k, v in d["items"].items()},
            info=dict(d.get("info", {})),
        )


# ----------------------------------------------------------------------------- metric names


def split_metric(metric: str) -> tuple[str, str | None]:
    """`"exact_match,flexible-extract"` → `("exact_match", "flexible-extract")`; `"acc"` →
    `("acc", None)` (None: whichever single filter produces it)."""
    name, _, filter_name = metric.partition(",")
    return name.strip(), (filter_name.strip() or None)


def metric_key(metric: str, filter_name: str) -> str:
    """Canonical spelling: lm-eval's `metric,filter`, with the default filter left out."""
    return metric if filter_name == NO_FILTER else f"{metric},{filter_name}"


def resolve_metric(requested: str, available: set[tuple[str, str]], task: str) -> tuple[str, str]:
    """Pick the (metric, filter) pair a requested name means, or say what exists."""
    name, filter_name = split_metric(requested)
    matches = sorted(
        (m, f) for m, f in available if m == name and (filter_name is None or f == filter_name)
    )
    if filter_name is None and len(matches) > 1:
        # `acc` alone means the unfiltered one when several filters produce it.
        matches = [(m, f) for m, f in matches if f == NO_FILTER] or matches
    if len(matches) != 1:
        names = sorted(metric_key(m, f) for m, f in available)
        why = "is ambiguous" if matches else "is not produced"
        raise BadInputError(f"task {task!r}: metric {requested!r} {why}; available: {names}")
    return matches[0]


# ----------------------------------------------------------------------------- task index


@functools.lru_cache(maxsize=1)
def _task_manager() -> TaskManager:
    """lm-eval's stock task index. Building it parses every task YAML (~7 s): once per process."""
    from lm_eval.tasks import TaskManager

    return TaskManager()


def _members(group_cfg: Mapping[str, Any]) -> list[str | dict[str, Any]]:
    members = group_cfg.get("task", [])
    return [members] if isinstance(members, str | dict) else list(members)


def leaf_configs(
    index: Mapping[str, Any], name: str, inherited: Mapping[str, Any] | None = None
) -> dict[str, dict[str, Any]]:
    """Leaf task name → its YAML config (functions unresolved), for a task, tag or group.

    Read from lm-eval's index without building any task (no data is loaded). Overrides flow
    down the way lm-eval's factory applies them: a group's own non-structural keys are
    defaults for its members, the caller's overrides win over those, and a member entry's
    own keys win over what it inherits.
    """
    entry = index[name]
    inherited = dict(inherited or {})
    kind = entry.kind.name
    if kind == "TAG":
        out: dict[str, dict[str, Any]] = {}
        for task in sorted(entry.tags):
            out.update(leaf_configs(index, task, inherited))
        return out
    if kind == "GROUP":
        return _group_leaf_configs(index, entry.cfg or {}, inherited)
    return {name: {**(entry.cfg or {}), **inherited}}


def _group_leaf_configs(
    index: Mapping[str, Any], group_cfg: Mapping[str, Any], inherited: dict[str, Any]
) -> dict[str, dict[str, Any]]:
    defaults = {k: v for k, v in group_cfg.items() if k not in _GROUP_KEYS}
    merged = {**defaults, **inherited}
    out: dict[str, dict[str, Any]] = {}
    for member in _members(group_cfg):
        if isinstance(member, str):
            ref, own = member, {}
        else:
            ref = member.get("group", member.get("task"))
            own = {k: v for k, v in member.items() if k not in ("group", "task")}
        overrides = {**merged, **own}
        if isinstance(ref, str) and ref in index:
            out.update(leaf_configs(index, ref, overrides))
        elif isinstance(member, dict) and "group" in member:  # inline sub-group
            out.update(_group_leaf_configs(index, member, merged))
        elif isinstance(member, dict) and isinstance(ref, str):  # inline task definition
            out[ref] = {**overrides, "task": ref}
    return out


def declared_metrics(cfg: Mapping[str, Any]) -> set[tuple[str, str]] | None:
    """(metric, filter) pairs a leaf config produces; None if only Python code knows."""
    from lm_eval.api.registry import DEFAULT_METRIC_REGISTRY

    metric_list = cfg.get("metric_list")
    if metric_list is not None:
        metrics = [m["metric"] for m in metric_list if isinstance(m.get("metric"), str)]
    elif "class" in cfg or "process_results" in cfg:
        return None
    else:
        metrics = list(DEFAULT_METRIC_REGISTRY.get(cfg.get("output_type"), []))
    filters = [f["name"] for f in cfg.get("filter_list") or []] or [NO_FILTER]
    return {(m, f) for m in metrics for f in filters} or None


def _common_metrics(leaves: Mapping[str, Mapping[str, Any]]) -> set[tuple[str, str]] | None:
    """Metrics every leaf produces (what a group-level score can be built from)."""
    per_leaf = [declared_metrics(cfg) for cfg in leaves.values()]
    if not per_leaf or any(m is None for m in per_leaf):
        return None
    return set.intersection(*per_leaf)  # type: ignore[arg-type]


def _close_matches(name: str, known: list[str]) -> list[str]:
    prefixed = [k for k in known if k.startswith(name)][:5]
    return prefixed or difflib.get_close_matches(name, known, n=5, cutoff=0.6)


def check_tasks(eval_cfg: EvalConfig) -> None:
    """Unknown task names, or metrics a task does not produce → BadInputError.

    Run before the model loads. Reads lm-eval's task index (~7 s the first time in a process,
    then cached); builds no task and loads no data. A metric is checked here when the task's
    YAML declares its metrics; tasks defined in Python are checked after their run.
    """
    index = _task_manager().task_index
    known = sorted(index)
    problems = []
    for task in eval_cfg.tasks:
        if task.name not in index:
            close = _close_matches(task.name, known)
            problems.append(f"unknown lm-eval task {task.name!r}; close matches: {close or 'none'}")
            continue
        if task.metric is not None:
            available = _common_metrics(leaf_configs(index, task.name))
            if available is not None:
                try:
                    resolve_metric(task.metric, available, task.name)
                except BadInputError as exc:
                    problems.append(str(exc))
    if problems:
        raise BadInputError("eval.tasks: " + "; ".join(problems))


def subtask_count(task_name: str) -> int:
    """How many leaf subtasks a task, group or tag runs (57 for mmlu), from lm-eval's index:
    a `limit` applies to each of them. Builds no task and loads no data."""
    return len(leaf_configs(_task_manager().task_index, task_name))


def primary_metric(task_name: str) -> str:
    """Default gating metric: `PRIMARY_METRICS` for mmlu/gsm8k, otherwise the first metric of
    the task's (first subtask's) config, under its first filter."""
    if task_name in PRIMARY_METRICS:
        return PRIMARY_METRICS[task_name]
    index = _task_manager().task_index
    if task_name not in index:
        raise BadInputError(f"unknown lm-eval task {task_name!r}")
    leaves = leaf_configs(index, task_name)
    first = next(iter(leaves.values()), {})
    metric_list = first.get("metric_list") or []
    if metric_list and isinstance(metric_list[0].get("metric"), str):
        metric = metric_list[0]["metric"]
    else:
        from lm_eval.api.registry import DEFAULT_METRIC_REGISTRY

        defaults = DEFAULT_METRIC_REGISTRY.get(first.get("output_type"), [])
        if not defaults:
            raise BadInputError(f"task {task_name!r}: no default metric; set eval.tasks[].metric")
        metric = defaults[0]
    filters = first.get("filter_list") or []
    return metric_key(metric, filters[0]["name"] if filters else NO_FILTER)


# ----------------------------------------------------------------------------- local data


def _raw_data_dir(eval_cfg: EvalConfig) -> tuple[str | None, str]:
    if eval_cfg.data_dir:
        return eval_cfg.data_dir, "eval.data_dir"
    env = os.environ.get(ENV_EVAL_DATA_DIR)
    return (env, f"${ENV_EVAL_DATA_DIR}") if env else (None, "")


def local_dataset_dirs(
    index: Mapping[str, Any], task_name: str, data_dir: Path, source: str = "data_dir"
) -> dict[str, Path]:
    """Leaf task → its local copy, `<data_dir>/<dataset_path>` (`cais/mmlu` → `<data_dir>/
    cais/mmlu`). DataError when a copy is missing or a subtask's dataset is only known to
    Python code (nothing to redirect)."""
    out: dict[str, Path] = {}
    for leaf, cfg in leaf_configs(index, task_name).items():
        dataset_path = cfg.get("dataset_path")
        if not isinstance(dataset_path, str):
            raise DataError(
                f"task {task_name!r}: subtask {leaf!r} has no dataset_path to redirect to "
                f"{data_dir} (from {source}); evaluate it without a data directory"
            )
        local = data_dir / dataset_path
        if not local.is_dir():
            raise DataError(
                f"evaluation data directory {data_dir} (from {source}) has no {local}: "
                f"task {task_name!r} needs a copy of the Hub dataset {dataset_path} there"
            )
        out[leaf] = local
    return out


def resolve_eval_data_dir(eval_cfg: EvalConfig) -> Path | None:
    """eval.data_dir, else $COMPRESS_EVAL_DATA_DIR, else None (= fetch from the Hub).

    A given directory must exist and hold every dataset the configured tasks read, as
    `<data_dir>/<dataset_path>` (`cais/mmlu` for mmlu, `openai/gsm8k` for gsm8k); otherwise
    DataError names the path and what was expected. Loads no data and no model; the dataset
    paths come from lm-eval's task index (shared with `check_tasks`). Unknown task names are
    left to `check_tasks`.
    """
    raw, source = _raw_data_dir(eval_cfg)
    if raw is None:
        return None
    data_dir = user_path(raw, field=source).resolve()
    if not data_dir.is_dir():
        raise DataError(f"evaluation data directory {data_dir} (from {source}) does not exist")
    index = _task_manager().task_index
    for task in eval_cfg.tasks:
        if task.name in index:  # validation only: the same checks evaluate_tasks relies on
            local = local_dataset_dirs(index, task.name, data_dir, source)
            wrapper_config(task.name, index[task.name].kind.name, local)
    return data_dir


def wrapper_config(name: str, kind: str, local_paths: Mapping[str, Path]) -> dict[str, Any]:
    """The wrapper group that runs stock task/group/tag `name` on local data.

    A group is referenced with `group:` so the override reaches all of its leaves through
    lm-eval's own group machinery. A tag is expanded to its tasks: lm-eval 0.4.13 lets a
    `task: <tag>` entry's name override the tag members' names.
    """
    if kind == "GROUP":
        paths = {str(p) for p in local_paths.values()}
        if len(paths) != 1:
            raise DataError(
                f"group {name!r} reads several datasets ({sorted(paths)}); a local data "
                "directory can only redirect groups over one dataset - list its subtasks"
            )
        members: list[dict[str, Any]] = [{"group": name, "dataset_path": paths.pop()}]
    else:
        members = [{"task": leaf, "dataset_path": str(p)} for leaf, p in local_paths.items()]
    return {"group": WRAPPER_PREFIX + name, "task": members}


@functools.lru_cache(maxsize=2)
def _local_task_manager(
    wrappers: tuple[tuple[str, str], ...],
) -> tuple[TaskManager, tempfile.TemporaryDirectory[str]]:
    """A TaskManager that also knows our wrapper groups, given as (file name, YAML text).

    The YAML files must outlive the manager (it reads them again when it builds the tasks),
    so the cache entry holds the temporary directory too; it is removed at interpreter exit.
    """
    from lm_eval.tasks import TaskManager

    tmp = tempfile.TemporaryDirectory(prefix="compress-lm-eval-")
    for filename, text in wrappers:
        (Path(tmp.name) / filename).write_text(text, encoding="utf-8")
    return TaskManager(include_path=tmp.name), tmp


def _task_specs(
    tasks: list[TaskConfig], data_dir: Path | None
) -> tuple[TaskManager, dict[str, str], dict[str, dict[str, Path]]]:
    """(manager, recipe task → name to give lm-eval, recipe task → leaf → local dataset dir)."""
    base = _task_manager()
    if data_dir is None:
        return base, {t.name: t.name for t in tasks}, {}
    index = base.task_index
    wrappers, specs, expected = [], {}, {}
    for task in tasks:
        local = local_dataset_dirs(index, task.name, data_dir)
        cfg = wrapper_config(task.name, index[task.name].kind.name, local)
        wrappers.append((f"{cfg['group']}.yaml", yaml.safe_dump(cfg, sort_keys=False)))
        specs[task.name] = cfg["group"]
        expected[task.name] = local
    return _local_task_manager(tuple(wrappers))[0], specs, expected


# ----------------------------------------------------------------------------- process state


@contextmanager
def _hub_offline(enabled: bool) -> Iterator[None]:
    """Put huggingface_hub/datasets offline for the duration, then restore.

    Both libraries read these variables once, at import; setting the environment alone would
    not reach an already-imported `datasets`, so their runtime flags are flipped too.
    """
    if not enabled:
        yield
        return
    import datasets.config
    import huggingface_hub.constants

    saved_env = {k: os.environ.get(k) for k in _OFFLINE_ENV}
    flags = [
        (datasets.config, "HF_HUB_OFFLINE"),
        (datasets.config, "HF_DATASETS_OFFLINE"),
        (huggingface_hub.constants, "HF_HUB_OFFLINE"),
    ]
    saved_flags = [(mod, attr, getattr(mod, attr)) for mod, attr in flags if hasattr(mod, attr)]
    os.environ.update(dict.fromkeys(_OFFLINE_ENV, "1"))
    for mod, attr, _ in saved_flags:
        setattr(mod, attr, True)
    try:
        yield
    finally:
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        for mod, attr, value in saved_flags:
            setattr(mod, attr, value)


@contextmanager
def _preserved_rng() -> Iterator[None]:
    """lm-eval seeds the global random/numpy/torch generators; leave them as we found them so
    evaluation does not change what later pipeline steps draw."""
    import numpy as np
    import torch

    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])


# ----------------------------------------------------------------------------- evaluation


def _available_from_samples(samples: Mapping[str, list[dict[str, Any]]]) -> set[tuple[str, str]]:
    """(metric, filter) pairs present in every subtask's logged samples."""
    per_leaf = [
        {(m, s["filter"]) for s in rows for m in s.get("metrics", [])} for rows in samples.values()
    ]
    return set.intersection(*per_leaf) if per_leaf else set()


def items_from_samples(
    samples: Mapping[str, list[dict[str, Any]]], metric: str, filter_name: str, task: str
) -> dict[str, float]:
    """`<subtask>/<doc_id>` → score, from lm-eval's logged samples, for one metric+filter."""
    items: dict[str, float] = {}
    for leaf in sorted(samples):
        for row in samples[leaf]:
            if row["filter"] != filter_name:
                continue
            score = row[metric]
            if isinstance(score, bool):
                score = float(score)
            if not isinstance(score, int | float):
                raise BadInputError(
                    f"task {task!r}: metric {metric!r} has no per-item score ({score!r}); "
                    "choose a metric that is a mean over items (e.g. acc, exact_match)"
                )
            items[f"{leaf}/{row['doc_id']}"] = float(score)
    return items


def _check_leaf_means(
    items: Mapping[str, float], results: Mapping[str, Any], key: str, task: str
) -> None:
    """Our per-subtask mean must equal lm-eval's own number; if not, the metric is not a plain
    mean over items (e.g. corpus-level F1) and per-item gating would be meaningless."""
    by_leaf: dict[str, list[float]] = {}
    for item_id, score in items.items():
        by_leaf.setdefault(item_id.rsplit("/", 1)[0], []).append(score)
    for leaf, scores in by_leaf.items():
        reported = results.get(leaf, {}).get(key)
        if isinstance(reported, int | float) and not math.isclose(
            reported, math.fsum(scores) / len(scores), rel_tol=1e-9, abs_tol=1e-9
        ):
            raise BadInputError(
                f"task {task!r}: lm-eval reports {key}={reported} for {leaf} but the mean of "
                "its items differs; that metric is not an item mean and cannot be gated per item"
            )


def _check_redirected(
    configs: Mapping[str, Mapping[str, Any]], expected: Mapping[str, Path], task: str
) -> None:
    """Guard against silently reading the Hub (or another copy) when local data was asked."""
    for leaf, local in expected.items():
        used = configs.get(leaf, {}).get("dataset_path")
        if used != str(local):
            raise DataError(f"task {task!r}: {leaf} read {used!r}, not the local copy {local}")


def _single_or_map(values: Mapping[str, Any]) -> Any:
    distinct = {repr(v) for v in values.values()}
    return next(iter(values.values())) if len(distinct) == 1 else dict(sorted(values.items()))


def _run_info(
    out: Mapping[str, Any],
    leaves: list[str],
    task: TaskConfig,
    eval_cfg: EvalConfig,
    model: Any,
    data_source: str,
) -> dict[str, Any]:
    return {
        "lm_eval_version": lm_eval_version(),
        "task_versions": {leaf: out["versions"].get(leaf) for leaf in leaves},
        "num_subtasks": len(leaves),
        "num_fewshot": _single_or_map({leaf: out["n-shot"].get(leaf) for leaf in leaves}),
        "limit": task.limit,
        "max_gen_toks": task.max_gen_toks,
        "seed": eval_cfg.seed,  # fewshot, python, numpy and torch seeds (lm-eval's --seed N)
        "batch_size": eval_cfg.batch_size,
        "dtype": str(getattr(model, "dtype", "unknown")).removeprefix("torch."),
        "device": str(getattr(model, "device", "unknown")),
        "data_source": data_source,
    }


def _simple_evaluate(
    lm: Any,
    task: TaskConfig,
    eval_cfg: EvalConfig,
    manager: TaskManager,
    spec: str,
    samples: dict[str, list[int]] | None = None,
) -> dict[str, Any] | None:
    """One lm-eval run: one recipe task (a task, tag or group, or its local-data wrapper),
    on its first `limit` items per subtask or on the chosen `samples` (subtask → doc ids)."""
    from lm_eval import simple_evaluate

    return simple_evaluate(
        model=lm,
        tasks=[spec],
        task_manager=manager,
        num_fewshot=task.num_fewshot,
        limit=None if samples is not None else task.limit,
        samples=samples,
        # Applies to generative tasks only; lm-eval ignores gen_kwargs for loglikelihood ones.
        gen_kwargs={"max_gen_toks": task.max_gen_toks} if task.max_gen_toks else None,
        batch_size=eval_cfg.batch_size,
        log_samples=True,
        bootstrap_iters=0,  # stderr by bootstrap is slow and unused: the gate pairs items
        # One seed for python, numpy, torch and few-shot sampling, like lm-eval's `--seed N`.
        random_seed=eval_cfg.seed,
        numpy_random_seed=eval_cfg.seed,
        torch_random_seed=eval_cfg.seed,
        fewshot_random_seed=eval_cfg.seed,
    )


def _evaluate_one(
    lm: Any,
    task: TaskConfig,
    eval_cfg: EvalConfig,
    manager: TaskManager,
    spec: str,
    expected_local: Mapping[str, Path],
    model: Any,
    data_source: str,
    selection: list[str] | None = None,
    leaves: Mapping[str, int] | None = None,
) -> TaskResult:
    samples = None if selection is None else samples_for(selection, leaves or {})
    logger.info(
        "lm-eval: %s (%s, num_fewshot=%s)",
        task.name,
        f"limit={task.limit}" if selection is None else f"{len(selection)} chosen items",
        task.num_fewshot,
    )
    try:
        out = _simple_evaluate(lm, task, eval_cfg, manager, spec, samples)
    except ConnectionError as exc:  # `datasets` raises this when the Hub cannot be reached
        raise DataError(
            f"task {task.name!r}: its dataset could not be fetched ({exc}); point eval.data_dir "
            f"or ${ENV_EVAL_DATA_DIR} at local copies laid out as <dir>/<org>/<name>"
        ) from exc
    if out is None:  # only non-zero ranks get None; we always run single-process
        raise DataError(f"task {task.name!r}: lm-eval returned no results")
    samples = out["samples"]
    _check_redirected(out["configs"], expected_local, task.name)
    requested = task.metric or primary_metric(task.name)
    metric, filter_name = resolve_metric(requested, _available_from_samples(samples), task.name)
    items = items_from_samples(samples, metric, filter_name, task.name)
    if not items:
        raise DataError(f"task {task.name!r}: lm-eval scored no items")
    _check_leaf_means(items, out["results"], f"{metric},{filter_name}", task.name)
    if selection is not None:  # drop the fillers that kept unchosen subtasks from running all
        chosen = set(selection)
        items = {k: v for k, v in items.items() if k in chosen}
    info = _run_info(out, sorted(samples), task, eval_cfg, model, data_source)
    info["prompt_digests"] = [prompt_digest(samples, filter_name, items)]
    return TaskResult(
        task=task.name,
        metric=metric_key(metric, filter_name),
        value=math.fsum(items.values()) / len(items),
        num_items=len(items),
        items=items,
        info=info,
    )


def evaluate_tasks(
    model: Any,
    tokenizer: Any,
    eval_cfg: EvalConfig,
    *,
    data_dir: Path | None,
    selections: Mapping[str, list[str]] | None = None,
) -> dict[str, TaskResult]:
    """Run every task of `eval_cfg` on the in-memory `model`; recipe task name → TaskResult.

    `data_dir` (from `resolve_eval_data_dir`) redirects every (sub)task's dataset to its local
    copy and keeps the Hub offline meanwhile; None fetches from the Hub. Each recipe task is
    its own lm-eval run, so its limit (per subtask), num_fewshot and max_gen_toks apply to it
    alone and its few-shot draw does not depend on the order of tasks. Global RNG states and
    the offline environment variables are restored afterwards. lm-eval puts the model in eval
    mode and may give the tokenizer a pad token.

    `selections` (recipe task → item ids, `<subtask>/<doc_id>`) scores only those items of a
    task (sequential evaluation); the others run on their first `limit` items per subtask.
    """
    from lm_eval.models.huggingface import HFLM

    check_tasks(eval_cfg)
    # Absolute, so lm-eval's recorded dataset_path does not depend on the working directory.
    data_dir = data_dir.resolve() if data_dir is not None else None
    manager, specs, expected = _task_specs(eval_cfg.tasks, data_dir)
    source = str(data_dir) if data_dir is not None else HUB_SOURCE
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=eval_cfg.batch_size)
    results: dict[str, TaskResult] = {}
    with _hub_offline(data_dir is not None), _preserved_rng():
        for task in eval_cfg.tasks:
            results[task.name] = _evaluate_one(
                lm,
                task,
                eval_cfg,
                manager,
                specs[task.name],
                expected.get(task.name, {}),
                model,
                source,
                None if selections is None else selections.get(task.name),
                None if selections is None else subtask_sizes(task, data_dir),
            )
            logger.info(
                "%s: %s = %.4f over %d items",
                task.name,
                results[task.name].metric,
                results[task.name].value,
                results[task.name].num_items,
            )
    return results


# ----------------------------------------------------------------------------- chosen items


def subtask_sizes(task: TaskConfig, data_dir: Path | None) -> dict[str, int]:
    """Subtask → how many items the task scores of it (its first `limit` docs)."""
    return dict(_subtask_sizes(task.model_dump_json(), None if data_dir is None else str(data_dir)))


@functools.lru_cache(maxsize=16)
def _subtask_sizes(task_json: str, data_dir: str | None) -> tuple[tuple[str, int], ...]:
    from lm_eval.tasks import get_task_dict

    task = TaskConfig.model_validate_json(task_json)
    manager, specs, _ = _task_specs([task], None if data_dir is None else Path(data_dir))
    with _hub_offline(data_dir is not None):
        task_dict = get_task_dict([specs[task.name]], manager)
    sizes = []
    for name, obj in _leaf_tasks(task_dict):
        count = len(obj.eval_docs)
        sizes.append((name, count if task.limit is None else min(count, task.limit)))
    return tuple(sorted(sizes))


def _leaf_tasks(task_dict: Mapping[Any, Any]) -> Iterator[tuple[str, Any]]:
    """(name, Task) of every leaf of lm-eval's nested task dict (groups are keyed by objects)."""
    for key, value in task_dict.items():
        if isinstance(value, Mapping):
            yield from _leaf_tasks(value)
        else:
            yield (key if isinstance(key, str) else key.group_name), value


def task_item_ids(task: TaskConfig, data_dir: Path | None) -> list[str]:
    """Every item id (`<subtask>/<doc_id>`) the task scores, without running a model."""
    return [
        f"{leaf}/{doc}"
        for leaf, count in subtask_sizes(task, data_dir).items()
        for doc in range(count)
    ]


def samples_for(selection: list[str], leaves: Mapping[str, int]) -> dict[str, list[int]]:
    """lm-eval's `samples`: subtask → sorted doc ids (lm-eval maps them back by position).

    A subtask missing from `samples` would be scored in full, and an empty list means the
    same to lm-eval, so each subtask without a chosen item gets its doc 0 as a filler, which
    is scored and dropped."""
    chosen: dict[str, set[int]] = {leaf: set() for leaf in leaves}
    for item_id in selection:
        leaf, _, doc = item_id.rpartition("/")
        if leaf not in chosen or not doc.isdigit() or int(doc) >= leaves[leaf]:
            raise BadInputError(f"item {item_id!r} is not one of the task's items")
        chosen[leaf].add(int(doc))
    return {leaf: sorted(docs) if docs else [0] for leaf, docs in chosen.items()}


def prompt_digest(
    samples: Mapping[str, list[dict[str, Any]]], filter_name: str, items: Mapping[str, float]
) -> str:
    """An order-free digest of the prompts of `items`: the sum of sha256(id, prompt hash) mod
    2^256, so the digests of disjoint batches add up. Two runs with equal digests asked the
    models the same questions with the same few-shot context."""
    total = 0
    for leaf, rows in samples.items():
        for row in rows:
            item_id = f"{leaf}/{row['doc_id']}"
            if row["filter"] == filter_name and item_id in items:
                text = f"{item_id}\0{row.get('prompt_hash', '')}".encode()
                total += int.from_bytes(hashlib.sha256(text).digest(), "big")
    return f"{total % (1 << 256):064x}"


def lm_eval_version() -> str:
    """The installed lm-eval version (part of the baseline cache key and of every report)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lm-eval")
    except PackageNotFoundError:
        return "not installed"
