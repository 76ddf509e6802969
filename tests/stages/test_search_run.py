"""`compress search` end to end on a tiny random Llama, lm-eval scripted (test_pipeline's
scorer): sensitivity, front, bisection with real GPTQ candidates judged on search windows, the
chosen recipe confirmed and published by the pipeline, the search sealed into its report."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict

import pytest

import compress
from compress.cli import main
from compress.errors import EXIT_BAD_INPUT, EXIT_OK, EXIT_REJECTED
from compress.quant.linear import QuantLinear
from compress.recipe import load_recipe
from compress.search.candidates import Format
from compress.search.executor import LocalExecutor
from compress.search.run import (
    CHOSEN_RECIPE,
    SEARCH_REPORT,
    SENSITIVITY_CACHE,
    load_inputs,
    measure,
)
from tests.stages.test_pipeline import scorer, small_calibration, write_held_out, write_recipe

__all__ = ["scorer"]  # the fixture, imported for its use here

MAX_KL = 8e-5


def _search_recipe(tmp_path, source, **search):
    tmp_path.mkdir(parents=True, exist_ok=True)
    held_out = write_held_out(tmp_path)
    return write_recipe(
        tmp_path,
        source,
        stages=[
            {
                "type": "quantize",
                "method": "gptq",
                "bits": 4,
                "group_size": 32,
                "symmetric": False,
            }
        ],
        calibration=small_calibration(tmp_path),
        eval={
            "tasks": [{"name": "mmlu", "limit": 1}],
            "quality": {"path": str(held_out), "seq_len": 32, "max_windows": 4},
        },
        gate={
            "rule": "point",
            "budgets": {"mmlu": {"max_drop": 0.10}},
            "quality": {"max_kl_divergence": MAX_KL},
        },
        search={
            "formats": ["int4-g32-asym", "int8-channel-sym", "keep"],
            "sensitivity_samples": 2,
            "sensitivity_seq_len": 32,
            "windows": 4,
            "max_candidates": 4,
            "resolution": 1,
            **search,
        },
    )


def test_search_ships_the_smallest_passing_candidate(tmp_path, tiny_llama_dir, scorer, caplog):
    scorer(artifact_right=20)
    recipe_path = _search_recipe(tmp_path, tiny_llama_dir)
    with caplog.at_level(logging.INFO):
        assert main(["search", str(recipe_path)]) == EXIT_OK
    folder = tmp_path / "runs" / "search" / "tiny-mixed"
    summary = json.loads((folder / SEARCH_REPORT).read_text())
    candidates = summary["candidates"]
    assert 1 <= len(candidates) <= 4
    # Under the point rule a candidate passes exactly when its measured KL is within budget.
    for candidate in candidates:
        assert candidate["passed"] == (candidate["kl"] <= MAX_KL)
    passing = [c for c in candidates if c["passed"]]
    chosen = min(passing, key=lambda c: c["index"])
    assert summary["chosen"] == chosen["index"]
    # The chosen recipe quantizes exactly the allocation; its artifact holds those formats.
    recipe = load_recipe(folder / CHOSEN_RECIPE)
    assert recipe.search is None and recipe.stages[0].method == "gptq"
    release = tmp_path / "runs" / "release" / "tiny-mixed"
    report = json.loads((release / "report.json").read_text())
    assert report["search"]["chosen"] == chosen["index"]
    model, _ = compress.load(release)
    specs = {n: m.spec for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    layer_groups = {
        g["name"]: g["layers"]
        for g in json.loads((folder / SENSITIVITY_CACHE).read_text())["groups"]
    }
    for group, fmt_name in summary["allocation"].items():
        fmt = Format.parse(fmt_name)
        for layer in layer_groups[group]:
            if fmt.bits == 16:
                assert layer not in specs
            else:
                spec = specs[layer]
                assert (spec.bits, spec.group_size, spec.symmetric) == (
                    fmt.bits,
                    fmt.group_size,
                    fmt.symmetric,
                )
    # The simulated error rate of the whole procedure is reported.
    rates = summary["false_ships"]
    assert rates["worst_case"]["confirmed"] <= rates["worst_case"]["unconfirmed"]


def test_resume_reuses_the_sensitivity_table(tmp_path, tiny_llama_dir, scorer, caplog):
    scorer(artifact_right=20)
    recipe_path = _search_recipe(tmp_path, tiny_llama_dir, max_candidates=1)
    main(["search", str(recipe_path)])
    with caplog.at_level(logging.INFO):
        main(["search", str(recipe_path), "--resume"])
    assert "sensitivity from" in caplog.text


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"formats": ["int4-g32-asym", "int5-g32-asym"]}, "int5-g32-asym"),
        ({"formats": ["keep", "keep"]}, "listed twice"),
    ],
)
def test_bad_search_settings_are_named(tmp_path, tiny_llama_dir, scorer, caplog, change, message):
    scorer(artifact_right=20)
    recipe_path = _search_recipe(tmp_path, tiny_llama_dir, **change)
    assert main(["search", str(recipe_path)]) == EXIT_BAD_INPUT
    assert "search.formats" in caplog.text and message in caplog.text


def test_ray_tasks_give_the_local_search_its_tables(tmp_path, tiny_llama_dir, scorer):
    """Sensitivity in one chunk per Ray worker and candidates as Ray tasks, each reloading the
    model from its source: the table measured in-process, and a first round of two."""
    pytest.importorskip("ray", reason="the ray extra is not installed")
    scorer(artifact_right=20)
    path = _search_recipe(
        tmp_path, tiny_llama_dir, max_candidates=2, executor="ray", ray={"num_cpus": 2}
    )
    # Two probes may both fail (exit 3, nothing to confirm): the tables are what is tested.
    assert main(["search", str(path)]) in (EXIT_OK, EXIT_REJECTED)
    folder = tmp_path / "runs" / "search" / "tiny-mixed"
    table = json.loads((folder / SENSITIVITY_CACHE).read_text())
    recipe = load_recipe(path)
    inputs = load_inputs(recipe, recipe.search)
    local = measure(inputs.model, inputs.sensitivity_windows, recipe, LocalExecutor(), 1)
    assert table["groups"] == json.loads(json.dumps([asdict(g) for g in local.groups]))
    for group, row in local.measured.items():
        assert table["measured"][group] == pytest.approx(row, rel=1e-3, abs=1e-9)
    summary = json.loads((folder / SEARCH_REPORT).read_text())
    assert summary["false_ships"]["parallelism"] == 2
    assert len(summary["candidates"]) == 2  # one round: both judged at once


@pytest.mark.parametrize("family", ["qwen2_moe", "mixtral", "phi3", "gemma2"])
def test_an_allocation_builds_on_other_families(family):
    """Fused projections (Phi-3), soft-caps (Gemma 2) and MoE: each searched group takes its
    format, the head gets its own stage, and experts (not searched) keep the template's scheme,
    also when the head's stage runs after them."""
    import torch

    from compress.quant.config import QuantizeConfig
    from compress.quant.experts import QuantExperts
    from compress.registry import StageContext, handler_for
    from compress.search.candidates import DEFAULT_FORMATS
    from compress.search.run import allocation_stages
    from compress.search.sensitivity import group_formats, layer_groups
    from tests.families import tiny_family_model

    model = tiny_family_model(family, 256).to(torch.bfloat16)
    groups = layer_groups(model, head=True)
    chosen = [group_formats(model, g, DEFAULT_FORMATS)[i % 2] for i, g in enumerate(groups)]
    template = QuantizeConfig(bits=4, group_size=32, symmetric=False)
    for stage in allocation_stages(template, groups, chosen):
        handler_for(stage).preflight(model, stage)
        handler_for(stage).apply(model, stage, StageContext(dtype="bfloat16"))
    specs = {n: m.spec for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    for group, fmt in zip(groups, chosen, strict=True):
        for layer in group.layers:
            assert (specs[layer].bits, specs[layer].group_size) == (fmt.bits, fmt.group_size)
    for module in model.modules():
        if isinstance(module, QuantExperts):
            spec = next(m.spec for m in module.modules() if isinstance(m, QuantLinear))
            assert (spec.bits, spec.group_size) == (4, 32)
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 5, 9, 30]])).logits).all()
