"""The whole flow on a tiny random Llama, with lm-eval replaced by a scripted scorer.

The scorer gives the baseline and the artifact chosen per-item results, so shipping, rejecting,
caching and resuming are tested deterministically; the real lm-eval path is tested in
tests/unit/test_lm_eval_runner.py and end to end in tests/e2e.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path

import pytest
import yaml
from torch import nn

from compress import pipeline
from compress.artifact import load_artifact, verify_artifact
from compress.cli import main
from compress.errors import (
    EXIT_BAD_INPUT,
    EXIT_INCONCLUSIVE,
    EXIT_OK,
    EXIT_REJECTED,
    BadInputError,
)
from compress.evaluate import lm_eval_runner
from compress.evaluate.lm_eval_runner import TaskResult
from compress.quant.linear import QuantLinear
from compress.registry import handler_for
from tests.conftest import save_tiny_llama
from tests.families import save_tiny_family

N_ITEMS = 20


class ScriptedScorer:
    """Stands in for lm-eval: the baseline gets every item right, the artifact `artifact_right`."""

    def __init__(self, artifact_right: int, n_items: int = N_ITEMS) -> None:
        self.artifact_right = artifact_right
        self.n_items = n_items
        self.calls: list[tuple[str, tuple[str, ...]]] = []

    def __call__(self, model: nn.Module, tokenizer, eval_cfg, *, data_dir, selections=None):
        quantized = any(isinstance(m, QuantLinear) for m in model.modules())
        label = "artifact" if quantized else "baseline"
        self.calls.append((label, tuple(t.name for t in eval_cfg.tasks)))
        right = self.artifact_right if quantized else self.n_items
        results = {}
        for task in eval_cfg.tasks:
            items = {f"{task.name}/{i}": float(i < right) for i in range(self.n_items)}
            if selections is not None and task.name in selections:
                items = {k: items[k] for k in selections[task.name]}
            results[task.name] = TaskResult(
                task=task.name,
                metric="acc",
                value=sum(items.values()) / len(items),
                num_items=len(items),
                items=items,
                info={"scripted": True, "prompt_digests": [f"{len(items)} items"]},
            )
        return results

    def item_ids(self, task, data_dir) -> list[str]:
        """Stands in for lm_eval_runner.task_item_ids."""
        return [f"{task.name}/{i}" for i in range(self.n_items)]


@pytest.fixture
def scorer(monkeypatch):
    def install(artifact_right: int, n_items: int = N_ITEMS) -> ScriptedScorer:
        scripted = ScriptedScorer(artifact_right, n_items)
        monkeypatch.setattr(lm_eval_runner, "evaluate_tasks", scripted)
        monkeypatch.setattr(lm_eval_runner, "task_item_ids", scripted.item_ids)
        return scripted

    monkeypatch.delenv("COMPRESS_EVAL_DATA_DIR", raising=False)
    return install


def write_recipe(tmp_path: Path, source: Path, **overrides) -> Path:
    recipe = {
        "version": 1,
        "name": "tiny-mixed",
        "model": {"source": str(source)},
        "dtype": "bfloat16",
        "stages": [
            {"type": "quantize", "bits": 8, "include": ["*.self_attn.*"]},
            {
                "type": "quantize",
                "bits": 4,
                "group_size": 32,
                "symmetric": False,
                "include": ["*.mlp.*"],
            },
        ],
        "eval": {"tasks": [{"name": "mmlu", "limit": 1}, {"name": "gsm8k", "limit": 2}]},
        # 20 scripted items decide nothing with confidence: these tests exercise the flow.
        "gate": {
            "rule": "point",
            "budgets": {"mmlu": {"max_drop": 0.10}, "gsm8k": {"max_drop": 0.10}},
        },
        "output": {"dir": str(tmp_path / "runs")},
    }
    recipe.update(overrides)
    path = tmp_path / "recipe.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(recipe))
    return path


def write_held_out(tmp_path: Path) -> Path:
    held_out = tmp_path / "held_out.txt"
    held_out.write_text("The quick brown fox jumps over the lazy dog. " * 200)
    return held_out


def small_calibration(tmp_path: Path) -> dict:
    """A `calibration` section: 4 windows of 32 tokens from a text written into tmp_path."""
    text = tmp_path / "calibration.txt"
    text.write_text("Calibration text about many different things, numbers 1 2 3. " * 300)
    return {"path": str(text), "num_samples": 4, "seq_len": 32, "batch_size": 2}


def test_ship(tmp_path, tiny_llama_dir, scorer):
    scripted = scorer(artifact_right=N_ITEMS - 1)  # a 5-point drop, within the 10-point budget
    held_out = write_held_out(tmp_path)
    recipe = write_recipe(
        tmp_path,
        tiny_llama_dir,
        eval={
            "tasks": [{"name": "mmlu", "limit": 1}, {"name": "gsm8k", "limit": 2}],
            "quality": {"path": str(held_out), "seq_len": 64, "max_windows": 3},
        },
    )
    outcome = pipeline.run(recipe)
    runs = tmp_path / "runs"
    assert outcome.verdict == "ship" and outcome.exit_code == EXIT_OK
    assert outcome.artifact_dir == runs / "release" / "tiny-mixed"
    verify_artifact(outcome.artifact_dir)
    report = json.loads((outcome.artifact_dir / "report.json").read_text())
    assert report["verdict"] == "ship"
    mmlu = next(t for t in report["gate"]["tasks"] if t["task"] == "mmlu")
    assert mmlu["drop"] == pytest.approx(0.05)
    assert mmlu["estimate"]["baseline_only"] == 1 and mmlu["outcome"] == "ship"
    low, high = mmlu["interval"]
    assert low < mmlu["drop"] < high
    assert [s["type"] for s in report["stages"]] == ["quantize", "quantize"]
    assert report["sizes"]["quantized_layers_ratio"] < 0.5
    quality = report["quality"]
    assert quality["num_windows"] == 3 and quality["kl_divergence"] > 0
    assert 0 < quality["top1_agreement"] <= 1
    assert quality["perplexity"] != quality["baseline_perplexity"]
    markdown = (outcome.artifact_dir / "report.md").read_text()
    assert "SHIP" in markdown and "KL(baseline ‖ artifact)" in markdown
    page = (outcome.artifact_dir / "report.html").read_text()
    assert "data:image/png;base64," in page and '<span class="badge ship">SHIP</span>' in page
    card = (outcome.artifact_dir / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["license"] == "apache-2.0"  # the tiny source's README front matter says so
    assert {"compress", "quantized", "int4-g32-asym"} <= set(front["tags"])
    assert "**SHIP**" in card and "type: quantize" in card  # verdict and recipe
    assert not (runs / "rejected").exists() and not (runs / "work" / "tiny-mixed").exists()
    assert [label for label, _ in scripted.calls] == ["baseline", "artifact"]


def test_quality_budget_rejects_what_the_task_budgets_pass(tmp_path, tiny_llama_dir, scorer):
    scorer(artifact_right=N_ITEMS)  # no task drop at all
    held_out = write_held_out(tmp_path)
    recipe = write_recipe(
        tmp_path,
        tiny_llama_dir,
        eval={
            "tasks": [{"name": "mmlu", "limit": 1}],
            "quality": {"path": str(held_out), "seq_len": 64, "max_windows": 2},
        },
        gate={
            "rule": "point",
            "budgets": {"mmlu": {"max_drop": 0.10}},
            # INT4 on a random model cannot keep KL this low; perplexity is allowed anything.
            "quality": {"max_kl_divergence": 1e-6, "max_perplexity_increase": 100.0},
        },
    )
    assert main(["run", str(recipe)]) == EXIT_REJECTED
    artifact = tmp_path / "runs" / "rejected" / "tiny-mixed"
    report = json.loads((artifact / "report.json").read_text())
    checks = {q["signal"]: q for q in report["gate"]["quality"]}
    assert checks["kl_divergence"]["passed"] is False
    kl = report["quality"]["kl_divergence"]
    assert checks["kl_divergence"]["value"] == pytest.approx(kl, rel=1e-12)
    assert checks["perplexity_increase"]["passed"] is True
    assert all(t["passed"] for t in report["gate"]["tasks"])
    assert "| kl_divergence |" in (artifact / "report.md").read_text()
    assert not (tmp_path / "runs" / "release").exists()


def test_a_collapsed_artifact_is_rejected_with_its_report_and_plots(
    tmp_path, demo_tokenizer, scorer, caplog
):
    """The failure a release pipeline must never see as exit 1: an artifact whose outputs
    collapse (perplexity doubled, KL of nats, every task item lost) ends in exit 3, sealed in
    rejected/ with a report whose every interval is on its signal's scale and holds its
    value, and the gate's plot drawn."""
    source = save_tiny_llama(tmp_path / "peaked", demo_tokenizer, initializer_range=0.5)
    scorer(artifact_right=0)
    held_out = write_held_out(tmp_path)
    recipe = write_recipe(
        tmp_path,
        source,
        stages=[{"type": "quantize", "bits": 4, "group_size": -1, "symmetric": True}],
        eval={
            "tasks": [{"name": "mmlu", "limit": 1}],
            "quality": {"path": str(held_out), "seq_len": 64, "max_windows": 4},
        },
        gate={
            "budgets": {"mmlu": {"max_drop": 0.10}},
            "quality": {
                "max_kl_divergence": 0.2,
                "max_perplexity_increase": 0.15,
                "min_top1_agreement": 0.75,
            },
        },
    )
    with caplog.at_level(logging.WARNING):
        assert main(["run", str(recipe)]) == EXIT_REJECTED
    folder = tmp_path / "runs" / "rejected" / "tiny-mixed"
    assert verify_artifact(folder)["verdict"]["verdict"] == "reject"
    report = json.loads((folder / "report.json").read_text())
    quality = {q["signal"]: q for q in report["gate"]["quality"]}
    assert quality["kl_divergence"]["value"] > 1 and quality["perplexity_increase"]["value"] > 0.5
    for check in quality.values():
        low, high = check["interval"]
        assert low <= check["value"] <= high and check["outcome"] == "reject"
    assert "not drawn" not in caplog.text  # the plot of a collapse is drawn, not skipped
    assert "data:image/png;base64," in (folder / "report.html").read_text()
    assert not (tmp_path / "runs" / "release").exists()


def test_reject_exits_3_and_releases_nothing(tmp_path, tiny_llama_dir, scorer):
    scorer(artifact_right=N_ITEMS - 4)  # a 20-point drop
    code = main(["run", str(write_recipe(tmp_path, tiny_llama_dir))])
    runs = tmp_path / "runs"
    assert code == EXIT_REJECTED
    assert not (runs / "release").exists() or not any((runs / "release").iterdir())
    report = json.loads((runs / "rejected" / "tiny-mixed" / "report.json").read_text())
    assert report["verdict"] == "reject"
    assert all(not t["passed"] for t in report["gate"]["tasks"])


def test_non_inferiority_ships_only_when_confident(tmp_path, tiny_llama_dir, scorer):
    gate = {"budgets": {"mmlu": {"max_drop": 0.05}}}  # rule: the default, non_inferiority
    eval_cfg = {"tasks": [{"name": "mmlu", "limit": 1}]}
    scorer(artifact_right=N_ITEMS)  # no drop, but 20 items cannot bound it under 5 points
    assert main(["run", str(write_recipe(tmp_path, tiny_llama_dir, gate=gate, eval=eval_cfg))]) == (
        EXIT_INCONCLUSIVE
    )
    runs = tmp_path / "runs"
    report = json.loads((runs / "inconclusive" / "tiny-mixed" / "report.json").read_text())
    (mmlu,) = report["gate"]["tasks"]
    assert report["verdict"] == "inconclusive" and mmlu["outcome"] == "inconclusive"
    assert mmlu["needed"] > N_ITEMS  # how many items would likely decide it
    assert "inconclusive (~" in (runs / "inconclusive" / "tiny-mixed" / "report.md").read_text()
    assert not (runs / "release").exists()

    scorer(artifact_right=2000, n_items=2000)  # the same artifact, scored on 2,000 items
    more = {"tasks": [{"name": "mmlu", "limit": 2}]}  # a new limit: a new baseline cache key
    outcome = pipeline.run(write_recipe(tmp_path, tiny_llama_dir, gate=gate, eval=more))
    assert outcome.verdict == "ship" and outcome.exit_code == EXIT_OK
    assert not (runs / "inconclusive" / "tiny-mixed").exists()  # the stale verdict is gone
    (mmlu,) = outcome.report["gate"]["tasks"]
    assert mmlu["upper"] <= 0.05 and mmlu["p_within"] <= 0.05


@pytest.mark.parametrize(
    ("artifact_right", "verdict", "code"),
    [(1995, "ship", EXIT_OK), (1500, "reject", EXIT_REJECTED)],  # drops of 0.25 / 25 points
)
def test_sequential_gate_stops_once_decided(
    tmp_path, tiny_llama_dir, scorer, artifact_right, verdict, code
):
    scripted = scorer(artifact_right=artifact_right, n_items=2000)
    gate = {
        "budgets": {"mmlu": {"max_drop": 0.05}},
        "sequential": {"looks": 5, "first": 200, "seed": 7},
    }
    eval_cfg = {"tasks": [{"name": "mmlu", "limit": 1}]}
    recipe = write_recipe(tmp_path, tiny_llama_dir, gate=gate, eval=eval_cfg)
    assert main(["run", str(recipe)]) == code
    folder = "release" if verdict == "ship" else "rejected"
    report_path = tmp_path / "runs" / folder / "tiny-mixed" / "report.json"
    report = json.loads(report_path.read_text())
    sequential = report["gate"]["sequential"]
    assert report["verdict"] == verdict and sequential["items_planned"] == 2000
    assert sequential["items_used"] < 2000 and sequential["look"] < 5
    # The baseline is scored in every look's batch; the artifact only until decided.
    labels = [label for label, _ in scripted.calls]
    assert labels.count("baseline") == 5 and labels.count("artifact") == sequential["look"]
    (mmlu,) = report["gate"]["tasks"]
    assert mmlu["estimate"]["n"] == sequential["items_used"] and mmlu["outcome"] == verdict
    # A replay re-runs the looks from the stored items and decides the same way.
    replayed = tmp_path / "replayed.json"
    assert main(["gate", "--replay", str(report_path), "--json", str(replayed)]) == code
    assert json.loads(replayed.read_text())["gate"] == report["gate"]


def test_baseline_scores_are_cached_across_runs(tmp_path, tiny_llama_dir, scorer):
    recipe = write_recipe(tmp_path, tiny_llama_dir)
    scorer(artifact_right=N_ITEMS)
    pipeline.run(recipe)
    second = scorer(artifact_right=N_ITEMS)
    outcome = pipeline.run(recipe)
    assert [label for label, _ in second.calls] == ["artifact"]
    assert outcome.report["evaluation"]["baseline_cached"] is True
    # A different task setting is a different cache entry.
    third = scorer(artifact_right=N_ITEMS)
    pipeline.run(
        write_recipe(
            tmp_path,
            tiny_llama_dir,
            eval={"tasks": [{"name": "mmlu", "limit": 2}, {"name": "gsm8k", "limit": 2}]},
        )
    )
    assert third.calls[0] == ("baseline", ("mmlu",))


class Interrupted(Exception):
    pass


def test_resume_after_interruption_skips_completed_stages(
    tmp_path, tiny_llama_dir, scorer, monkeypatch
):
    scorer(artifact_right=N_ITEMS)
    reference = pipeline.run(write_recipe(tmp_path / "ref", tiny_llama_dir))
    reference_weights = (reference.artifact_dir / "model.safetensors").read_bytes()

    recipe = write_recipe(tmp_path, tiny_llama_dir)
    applied: list[int] = []
    real_handler_for = handler_for

    def interrupting_handler_for(config, fail_on_second: bool):
        handler = real_handler_for(config)

        def apply(model, cfg, context):
            index = cfg.bits == 4  # the recipe's second stage is the INT4 one
            if fail_on_second and index:
                raise Interrupted("killed during stage 2")
            applied.append(int(index))
            return handler.apply(model, cfg, context)

        return type(handler)(handler.config_type, handler.preflight, apply)

    monkeypatch.setattr(pipeline, "handler_for", lambda c: interrupting_handler_for(c, True))
    with pytest.raises(Interrupted):
        pipeline.run(recipe)
    state = json.loads((tmp_path / "runs" / "work" / "tiny-mixed" / "state.json").read_text())
    assert [s["index"] for s in state["stages"]] == [0]

    monkeypatch.setattr(pipeline, "handler_for", lambda c: interrupting_handler_for(c, False))
    outcome = pipeline.run(recipe, resume=True)
    assert applied == [0, 1]  # stage 1 ran once, before the interruption; stage 2 once after
    assert outcome.verdict == "ship"
    assert (outcome.artifact_dir / "model.safetensors").read_bytes() == reference_weights


def test_interrupted_between_verdict_seal_and_publish_resumes(
    tmp_path, tiny_llama_dir, scorer, monkeypatch
):
    """Killed after the verdict was sealed into the work directory's artifact but before it
    was published: nothing is released half-done, and --resume writes the report again,
    reseals and publishes a complete artifact."""
    scorer(artifact_right=N_ITEMS)
    recipe = write_recipe(tmp_path, tiny_llama_dir)
    real_publish = pipeline.publish

    def interrupted(*_args, **_kwargs):
        raise Interrupted

    monkeypatch.setattr(pipeline, "publish", interrupted)
    with pytest.raises(Interrupted):
        pipeline.run(recipe)
    work_artifact = tmp_path / "runs" / "work" / "tiny-mixed" / "artifact"
    assert verify_artifact(work_artifact)["verdict"]["verdict"] == "ship"
    assert not (tmp_path / "runs" / "release").exists()

    monkeypatch.setattr(pipeline, "publish", real_publish)
    outcome = pipeline.run(recipe, resume=True)
    assert outcome.verdict == "ship"
    manifest = verify_artifact(outcome.artifact_dir)
    assert manifest["verdict"]["verdict"] == "ship" and "report.json" in manifest["files"]
    assert not (tmp_path / "runs" / "work" / "tiny-mixed").exists()


def test_resume_refuses_a_changed_recipe(tmp_path, tiny_llama_dir, scorer, monkeypatch):
    scorer(artifact_right=N_ITEMS)
    recipe = write_recipe(tmp_path, tiny_llama_dir)

    def boom(*_args, **_kwargs):
        raise Interrupted

    monkeypatch.setattr(pipeline, "run_stages", boom)
    with pytest.raises(Interrupted):
        pipeline.run(recipe)
    changed = write_recipe(tmp_path, tiny_llama_dir, dtype="float32")
    with pytest.raises(BadInputError, match="different recipe"):
        pipeline.run(changed, resume=True)


def test_preflight_failure_exits_2_before_any_evaluation(tmp_path, tiny_llama_dir, scorer):
    scripted = scorer(artifact_right=N_ITEMS)
    recipe = write_recipe(
        tmp_path,
        tiny_llama_dir,
        stages=[{"type": "quantize", "bits": 4, "group_size": 48}],
    )
    assert main(["run", str(recipe)]) == EXIT_BAD_INPUT
    assert scripted.calls == []


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ({"model": {"source": "/nonexistent/model.gguf"}}, "no such file"),
        ({"model": {"source": "package:not_a_package/x.gguf"}}, "not installed"),
    ],
)
def test_bad_model_source_exits_2(tmp_path, tiny_llama_dir, scorer, caplog, override, expected):
    scorer(artifact_right=N_ITEMS)
    assert main(["run", str(write_recipe(tmp_path, tiny_llama_dir, **override))]) == EXIT_BAD_INPUT
    assert expected in caplog.text


def test_missing_eval_data_dir_exits_2(tmp_path, tiny_llama_dir, scorer, caplog):
    scorer(artifact_right=N_ITEMS)
    recipe = write_recipe(
        tmp_path,
        tiny_llama_dir,
        eval={"tasks": [{"name": "mmlu", "limit": 1}], "data_dir": str(tmp_path / "no-data")},
        gate={"budgets": {"mmlu": {"max_drop": 0.1}}},
    )
    assert main(["run", str(recipe)]) == EXIT_BAD_INPUT
    assert "no-data" in caplog.text


def test_gptq_through_the_pipeline_with_calibration(tmp_path, tiny_llama_dir, scorer):
    scorer(artifact_right=N_ITEMS)
    recipe = write_recipe(
        tmp_path,
        tiny_llama_dir,
        calibration=small_calibration(tmp_path),
        stages=[{"type": "quantize", "method": "gptq", "bits": 4, "group_size": 32}],
    )
    outcome = pipeline.run(recipe)
    details = outcome.report["stages"][0]["details"]
    assert details["method"] == "gptq" and details["calibration_tokens"] == 4 * 32


def test_missing_calibration_file_exits_2(tmp_path, tiny_llama_dir, scorer, caplog):
    scripted = scorer(artifact_right=N_ITEMS)
    recipe = write_recipe(
        tmp_path,
        tiny_llama_dir,
        calibration={"path": str(tmp_path / "missing.txt")},
        stages=[{"type": "quantize", "method": "gptq", "bits": 4, "group_size": 32}],
    )
    assert main(["run", str(recipe)]) == EXIT_BAD_INPUT
    assert "calibration.path" in caplog.text and scripted.calls == []


def test_bad_recipe_exits_2_naming_the_field(tmp_path, tiny_llama_dir, caplog):
    recipe = write_recipe(
        tmp_path, tiny_llama_dir, stages=[{"type": "quantize", "bits": 4, "group_sise": 64}]
    )
    assert main(["run", str(recipe)]) == EXIT_BAD_INPUT
    assert "recipe.yaml" in caplog.text and "stages[0].group_sise" in caplog.text


def test_prune_then_quantize_through_the_pipeline(tmp_path, tiny_llama_dir, scorer):
    scorer(artifact_right=N_ITEMS)
    recipe = write_recipe(
        tmp_path,
        tiny_llama_dir,
        calibration=small_calibration(tmp_path),
        stages=[
            {
                "type": "prune",
                "criterion": "activation",
                "heads": {"ratio": 0.5},  # 4 query heads in 2 KV groups → 2, one per group
                "ffn": {"ratio": 0.25, "multiple_of": 32},  # 128 → 96 channels
            },
            {"type": "quantize", "method": "gptq", "bits": 4, "group_size": 32},
        ],
    )
    outcome = pipeline.run(recipe)
    assert outcome.verdict == "ship"
    prune, quantize = outcome.report["stages"]
    assert prune["details"]["per_layer_after"] == {
        "query_heads": 2,
        "kv_heads": 2,
        "head_dim": 16,
        "ffn_channels": 96,
    }
    assert prune["details"]["parameters_after"] < prune["details"]["parameters_before"]
    assert quantize["details"]["layers"] == 14
    config = json.loads((outcome.artifact_dir / "config.json").read_text())
    assert (config["num_attention_heads"], config["intermediate_size"]) == (2, 96)
    model, _ = load_artifact(outcome.artifact_dir)
    down = model.model.layers[0].mlp.down_proj
    assert isinstance(down, QuantLinear) and down.in_features == 96
    markdown = (outcome.artifact_dir / "report.md").read_text()
    assert "## Pruning (stage 0)" in markdown and "| after | 2 | 2 | 16 | 96 | 2 |" in markdown


def test_quantize_after_prune_is_checked_against_the_pruned_shapes(
    tmp_path, tiny_llama_dir, scorer, caplog, monkeypatch
):
    scripted = scorer(artifact_right=N_ITEMS)

    def no_weights(*_args):
        raise AssertionError("the weights loaded before the stages were checked")

    monkeypatch.setattr(pipeline, "load_weights", no_weights)
    recipe = write_recipe(
        tmp_path,
        tiny_llama_dir,
        stages=[
            {"type": "prune", "criterion": "magnitude", "ffn": {"keep": 80, "multiple_of": 16}},
            # 32 divides the source's 128 FFN channels but not the pruned 80.
            {"type": "quantize", "bits": 4, "group_size": 32},
        ],
    )
    assert main(["run", str(recipe)]) == EXIT_BAD_INPUT
    assert "stages[1].group_size" in caplog.text and "in_features=80" in caplog.text
    assert scripted.calls == []  # refused before the weights loaded (the skeleton was checked)
    assert not (tmp_path / "runs" / "work" / "tiny-mixed" / "checkpoint").exists()


def test_resume_after_prune_continues_from_the_pruned_checkpoint(
    tmp_path, tiny_llama_dir, scorer, monkeypatch
):
    scorer(artifact_right=N_ITEMS)
    stages = [
        {"type": "prune", "criterion": "magnitude", "heads": {"keep": 2}, "ffn": {"keep": 96}},
        {"type": "quantize", "bits": 8},
    ]
    reference = pipeline.run(write_recipe(tmp_path / "ref", tiny_llama_dir, stages=stages))
    reference_weights = (reference.artifact_dir / "model.safetensors").read_bytes()

    recipe = write_recipe(tmp_path, tiny_llama_dir, stages=stages)
    real_handler_for = handler_for

    def failing_quantize(config):
        handler = real_handler_for(config)
        if config.type != "quantize":
            return handler

        def apply(model, cfg, context):
            raise Interrupted("killed during quantize")

        return type(handler)(handler.config_type, handler.preflight, apply, handler.plan)

    monkeypatch.setattr(pipeline, "handler_for", failing_quantize)
    with pytest.raises(Interrupted):
        pipeline.run(recipe)
    checkpoint = tmp_path / "runs" / "work" / "tiny-mixed" / "checkpoint"
    assert json.loads((checkpoint / "config.json").read_text())["intermediate_size"] == 96

    monkeypatch.setattr(pipeline, "handler_for", real_handler_for)
    outcome = pipeline.run(recipe, resume=True)
    assert [s["type"] for s in outcome.report["stages"]] == ["prune", "quantize"]
    assert (outcome.artifact_dir / "model.safetensors").read_bytes() == reference_weights


def test_prune_distill_quantize_resumes_inside_distillation(
    tmp_path, tiny_llama_dir, scorer, monkeypatch
):
    from compress.distill import trainer

    scorer(artifact_right=N_ITEMS)
    stages = [
        {"type": "prune", "criterion": "activation", "ffn": {"ratio": 0.25, "multiple_of": 32}},
        {"type": "distill", "steps": 5, "batch_size": 2, "checkpoint_every": 2, "lr": 1e-4},
        {"type": "quantize", "bits": 8},
    ]
    calibration = small_calibration(tmp_path)
    reference = pipeline.run(
        write_recipe(tmp_path / "ref", tiny_llama_dir, stages=stages, calibration=calibration)
    )
    distill = reference.report["stages"][1]["details"]
    assert distill["steps"] == 5 and distill["resumed_from_step"] is None

    real = trainer._Setup.accumulate_gradients

    def dies_at_step_3(self, step):
        if step == 3:
            raise Interrupted("killed during distillation")
        return real(self, step)

    monkeypatch.setattr(trainer._Setup, "accumulate_gradients", dies_at_step_3)
    recipe = write_recipe(tmp_path, tiny_llama_dir, stages=stages, calibration=calibration)
    with pytest.raises(Interrupted):
        pipeline.run(recipe)
    assert (tmp_path / "runs" / "work" / "tiny-mixed" / "stage-1" / trainer.TRAINER).is_file()

    monkeypatch.setattr(trainer._Setup, "accumulate_gradients", real)
    outcome = pipeline.run(recipe, resume=True)
    assert outcome.report["stages"][1]["details"]["resumed_from_step"] == 2
    verify_artifact(outcome.artifact_dir)
    markdown = (outcome.artifact_dir / "report.md").read_text()
    assert "## Distillation (stage 1)" in markdown and "resumed at step 2" in markdown
    if importlib.util.find_spec("matplotlib") is not None:  # the `report` extra
        (plot,) = outcome.report["plots"]
        assert (outcome.artifact_dir / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({plot})" in markdown
    weights = (outcome.artifact_dir / "model.safetensors").read_bytes()
    assert weights == (reference.artifact_dir / "model.safetensors").read_bytes()


def test_a_named_teacher_that_does_not_exist_exits_2_before_any_work(
    tmp_path, tiny_llama_dir, scorer, caplog
):
    scripted = scorer(artifact_right=N_ITEMS)
    stages = [{"type": "distill", "steps": 2, "teacher": str(tmp_path / "no-such-teacher")}]
    recipe = write_recipe(
        tmp_path, tiny_llama_dir, stages=stages, calibration=small_calibration(tmp_path)
    )
    assert main(["run", str(recipe)]) == EXIT_BAD_INPUT
    assert "no-such-teacher" in caplog.text and scripted.calls == []


def test_a_named_teacher_is_loaded_for_distillation(tmp_path, tiny_llama_dir, scorer):
    scorer(artifact_right=N_ITEMS)
    stages = [
        {"type": "distill", "steps": 2, "batch_size": 2, "teacher": str(tiny_llama_dir)},
        {"type": "quantize", "bits": 8},
    ]
    recipe = write_recipe(
        tmp_path, tiny_llama_dir, stages=stages, calibration=small_calibration(tmp_path)
    )
    outcome = pipeline.run(recipe)
    assert outcome.report["stages"][0]["details"]["steps"] == 2


@pytest.mark.parametrize("family", ["gemma2", "granite"])
def test_bos_windows_and_post_processed_logits_through_the_pipeline(
    tmp_path, bos_tokenizer, scorer, family
):
    """A BOS tokenizer and a model that post-processes its logits (Gemma 2's soft-capping,
    Granite's logits_scaling): GPTQ calibrates and the gate measures on windows that start with
    BOS, the KL gate decides, and the report says which convention was used."""
    scorer(artifact_right=N_ITEMS)
    source = save_tiny_family(tmp_path / family, family, bos_tokenizer)
    recipe = write_recipe(
        tmp_path,
        source,
        calibration=small_calibration(tmp_path),
        stages=[{"type": "quantize", "method": "gptq", "bits": 4, "group_size": 32}],
        eval={
            "tasks": [{"name": "mmlu", "limit": 1}],
            "quality": {"path": str(write_held_out(tmp_path)), "seq_len": 32, "max_windows": 3},
        },
        gate={
            "rule": "point",
            "budgets": {"mmlu": {"max_drop": 0.10}},
            "quality": {"max_kl_divergence": 5.0},
        },
    )
    assert pipeline.check(recipe)["windows_start_with_bos"] is True
    windows = []
    real_measure = pipeline.measure_quality

    def spy(model, held_out, baseline):
        windows.append(held_out)
        return real_measure(model, held_out, baseline)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pipeline, "measure_quality", spy)
        outcome = pipeline.run(recipe)
    assert outcome.exit_code == EXIT_OK, outcome
    (held_out,) = windows
    assert (held_out[:, 0] == bos_tokenizer.bos_token_id).all()
    assert (held_out[:, 1:] != bos_tokenizer.bos_token_id).all()
    report = json.loads((outcome.artifact_dir / "report.json").read_text())
    assert report["evaluation"]["windows"]["starts_with_bos"] is True
    assert report["quality"]["kl_divergence"] > 0
    assert "Every window starts with BOS" in (outcome.artifact_dir / "report.md").read_text()


def test_a_moe_model_ships_with_every_expert_quantized(tmp_path, demo_tokenizer, scorer):
    """Qwen2-MoE through the whole run with GPTQ: the report states the quantized share of the
    decoder's weights (experts included), and the shipped artifact reloads with no float
    expert weights left."""
    scorer(artifact_right=N_ITEMS)
    source = save_tiny_family(tmp_path / "moe", "qwen2_moe", demo_tokenizer)
    recipe = write_recipe(
        tmp_path,
        source,
        calibration=small_calibration(tmp_path),
        stages=[{"type": "quantize", "method": "gptq", "bits": 4, "group_size": 32}],
        eval={"tasks": [{"name": "mmlu", "limit": 1}]},
        gate={"rule": "point", "budgets": {"mmlu": {"max_drop": 0.10}}},
    )
    outcome = pipeline.run(recipe)
    assert outcome.exit_code == EXIT_OK, outcome
    report = json.loads((outcome.artifact_dir / "report.json").read_text())
    (stage,) = report["stages"]
    assert stage["details"]["quantized_weight_share"] > 0.99  # all but the routers
    model, _ = load_artifact(outcome.artifact_dir)
    floats = [
        name
        for name, p in model.named_parameters()
        if ".experts." in name and p.is_floating_point() and p.dim() >= 2
    ]
    assert not floats, floats
