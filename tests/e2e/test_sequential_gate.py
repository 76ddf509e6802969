"""A sequential gate through real lm-eval on a tiny random Llama: items are scored in seeded
batches chosen with lm-eval's `samples` (subtasks without a chosen item get a filler that is
dropped), the baseline in every batch, the artifact until the verdict is decided; both models
see the same prompts batch by batch (their digests must match), and a replay agrees."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

pytestmark = pytest.mark.slow


def test_sequential_gate_with_real_lm_eval(tmp_path, tiny_llama_dir, eval_data_dir):
    recipe = {
        "version": 1,
        "name": "sequential",
        "model": {"source": str(tiny_llama_dir)},
        "dtype": "bfloat16",
        "stages": [{"type": "quantize", "bits": 8}],
        "eval": {
            "tasks": [
                # 13 subtasks × 2 items: the first batch of 8 leaves subtasks without an item.
                {"name": "mmlu_humanities", "num_fewshot": 1, "limit": 2},
                # gsm8k draws its few-shot examples at random: prompts depend on the batches.
                {"name": "gsm8k", "num_fewshot": 2, "limit": 8, "max_gen_toks": 4},
            ]
        },
        "gate": {
            # A budget no random model can miss, so the first look decides.
            "budgets": {"mmlu_humanities": {"max_drop": 1.0}, "gsm8k": {"max_drop": 1.0}},
            "sequential": {"looks": 3, "first": 4, "seed": 3},
        },
        "output": {"dir": str(tmp_path / "runs")},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    env = {**os.environ, "COMPRESS_EVAL_DATA_DIR": str(eval_data_dir), "HF_HUB_OFFLINE": "1"}
    run = subprocess.run(
        [sys.executable, "-m", "compress", "run", str(path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    report_path = tmp_path / "runs" / "release" / "sequential" / "report.json"
    report = json.loads(report_path.read_text())
    states = report["gate"]["sequential"]["tasks"]
    assert {n: (s["outcome"], s["look"]) for n, s in states.items()} == {
        "mmlu_humanities": ("ship", 1),
        "gsm8k": ("ship", 1),
    }
    baseline, artifact = report["evaluation"]["baseline"], report["evaluation"]["artifact"]
    assert baseline["mmlu_humanities"]["num_items"] == 26  # every look's batch
    assert artifact["mmlu_humanities"]["num_items"] == states["mmlu_humanities"]["items_used"] == 4
    assert len(baseline["gsm8k"]["info"]["prompt_digests"]) == 3
    assert (
        artifact["gsm8k"]["info"]["prompt_digests"]
        == baseline["gsm8k"]["info"]["prompt_digests"][:1]
    )
    assert set(artifact["gsm8k"]["items"]) < set(baseline["gsm8k"]["items"])

    replayed = tmp_path / "replayed.json"
    command = ["gate", "--replay", str(report_path), "--json", str(replayed)]
    replay = subprocess.run(
        [sys.executable, "-m", "compress", *command],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert replay.returncode == 0, replay.stderr[-2000:]
    assert json.loads(replayed.read_text())["gate"] == report["gate"]
