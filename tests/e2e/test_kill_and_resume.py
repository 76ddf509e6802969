"""A real `kill -9` in the middle of `compress run`, then `compress run --resume`.

The run is killed while it evaluates the sealed artifact (the longest phase); the resumed run
must not redo the stages or rescore the baseline, and must end with the same verdict and the
same weights as a run that was never interrupted.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow


def _recipe(tmp_path: Path, source: Path, name: str) -> Path:
    recipe = {
        "version": 1,
        "name": name,
        "model": {"source": str(source)},
        "dtype": "bfloat16",
        "stages": [
            {"type": "quantize", "bits": 8, "include": ["*.self_attn.*"]},
            {"type": "quantize", "bits": 4, "group_size": 32, "include": ["*.mlp.*"]},
        ],
        "eval": {"tasks": [{"name": "mmlu_anatomy", "num_fewshot": 1, "limit": 8}]},
        "gate": {"budgets": {"mmlu_anatomy": {"max_drop": 1.0}}},
        "output": {"dir": str(tmp_path / "runs")},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _command(recipe: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "compress", "run", str(recipe), *extra]


def test_kill_9_during_evaluation_then_resume(tmp_path, tiny_llama_dir, eval_data_dir):
    env = {**os.environ, "COMPRESS_EVAL_DATA_DIR": str(eval_data_dir), "HF_HUB_OFFLINE": "1"}
    recipe = _recipe(tmp_path, tiny_llama_dir, "killed")
    work = tmp_path / "runs" / "work" / "killed"

    log_path = tmp_path / "first.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen(_command(recipe), env=env, stdout=log, stderr=log)
        deadline = time.monotonic() + 600
        # The artifact is sealed once its manifest exists and state.json says so.
        while time.monotonic() < deadline and proc.poll() is None:
            state = work / "state.json"
            if state.is_file() and json.loads(state.read_text()).get("artifact_sealed"):
                break
            time.sleep(0.05)
        assert proc.poll() is None, f"run ended before it could be killed:\n{log_path.read_text()}"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not (tmp_path / "runs" / "release").exists()
    assert (work / "artifact" / "manifest.json").is_file()

    resumed = subprocess.run(
        _command(recipe, "--resume"), env=env, capture_output=True, text=True, timeout=600
    )
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "resuming" in resumed.stderr
    assert "stage 1/2" not in resumed.stderr  # no stage ran again
    assert "baseline mmlu_anatomy: cached" in resumed.stderr
    released = tmp_path / "runs" / "release" / "killed"
    assert (released / "report.json").is_file() and not work.exists()

    reference_recipe = _recipe(tmp_path, tiny_llama_dir, "uninterrupted")
    reference = subprocess.run(
        _command(reference_recipe), env=env, capture_output=True, text=True, timeout=600
    )
    assert reference.returncode == 0, reference.stderr[-4000:]
    uninterrupted = tmp_path / "runs" / "release" / "uninterrupted"
    weights = "model.safetensors"
    assert (released / weights).read_bytes() == (uninterrupted / weights).read_bytes()
    scores = [
        json.loads((d / "report.json").read_text())["gate"]["tasks"][0]
        for d in (released, uninterrupted)
    ]
    assert scores[0]["artifact"] == scores[1]["artifact"]
    assert scores[0]["baseline"] == scores[1]["baseline"]


def test_kill_9_during_distillation_then_resume(tmp_path, tiny_llama_dir, eval_data_dir):
    """Killed between two in-stage checkpoints of a distill stage; the resumed run continues
    from the last checkpoint and ends with the weights of a run that was never interrupted."""
    env = {**os.environ, "COMPRESS_EVAL_DATA_DIR": str(eval_data_dir), "HF_HUB_OFFLINE": "1"}
    text = tmp_path / "calibration.txt"
    text.write_text("Distillation needs text, and this sentence is the text. " * 400)

    def recipe(name: str) -> Path:
        path = _recipe(tmp_path, tiny_llama_dir, name)
        data = yaml.safe_load(path.read_text())
        data["calibration"] = {"path": str(text), "num_samples": 8, "seq_len": 32}
        data["stages"] = [
            {"type": "distill", "steps": 60, "batch_size": 2, "checkpoint_every": 5},
            {"type": "quantize", "bits": 8},
        ]
        data["eval"]["tasks"][0]["limit"] = 2
        path.write_text(yaml.safe_dump(data))
        return path

    killed = recipe("distill-killed")
    checkpoint = tmp_path / "runs" / "work" / "distill-killed" / "stage-0" / "trainer.json"
    log_path = tmp_path / "first.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen(_command(killed), env=env, stdout=log, stderr=log)
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and proc.poll() is None and not checkpoint.is_file():
            time.sleep(0.02)
        assert proc.poll() is None, f"run ended before it could be killed:\n{log_path.read_text()}"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    step = json.loads(checkpoint.read_text())["step"]
    assert 5 <= step < 60

    resumed = subprocess.run(
        _command(killed, "--resume"), env=env, capture_output=True, text=True, timeout=600
    )
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "distill: resuming at step" in resumed.stderr
    reference = subprocess.run(
        _command(recipe("distill-uninterrupted")),
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert reference.returncode == 0, reference.stderr[-4000:]
    release = tmp_path / "runs" / "release"
    weights = [
        (release / n / "model.safetensors").read_bytes()
        for n in ("distill-killed", "distill-uninterrupted")
    ]
    assert weights[0] == weights[1]
