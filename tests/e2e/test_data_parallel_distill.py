"""`accelerate launch --multi_gpu --num_processes 2 -m compress run` on a distill recipe, on CPU.

Two CPU processes (gloo) split every micro-batch; rank 0 runs the rest of the pipeline alone.
The launched run must end with the weights of a one-process run of the same recipe, up to the
order of floating-point sums, and its report must say it trained on two processes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

WEIGHTS = "model.safetensors"


def _recipe(tmp_path: Path, source: Path, name: str, batch_size: int = 4) -> Path:
    text = tmp_path / "calibration.txt"
    text.write_text("Data-parallel distillation splits each batch; this is its text. " * 400)
    recipe = {
        "version": 1,
        "name": name,
        "model": {"source": str(source)},
        "dtype": "float32",  # no bfloat16 rounding between the two runs' weights
        "calibration": {"path": str(text), "num_samples": 8, "seq_len": 32},
        "stages": [
            {
                "type": "distill",
                "steps": 6,
                "batch_size": batch_size,
                "lr": 1e-3,
                "warmup_steps": 1,
                "checkpoint_every": 2,
                "device": "cpu",
            }
        ],
        "eval": {"tasks": [{"name": "mmlu_anatomy", "num_fewshot": 0, "limit": 2}]},
        "gate": {"budgets": {"mmlu_anatomy": {"max_drop": 1.0}}},
        "output": {"dir": str(tmp_path / "runs")},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _launch(recipe: Path, processes: int, env: dict) -> subprocess.CompletedProcess:
    launcher = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        # accelerate's --cpu launcher needs mpirun for several processes; --multi_gpu goes
        # through torchrun, which on a machine without CUDA starts gloo CPU processes.
        "--multi_gpu",
        "--num_processes",
        str(processes),
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        "29517",
        "-m",
        "compress",
    ]
    command = launcher if processes > 1 else [sys.executable, "-m", "compress"]
    return subprocess.run(
        [*command, "run", str(recipe)], env=env, capture_output=True, text=True, timeout=900
    )


@pytest.fixture
def env(eval_data_dir) -> dict:
    # The student must not be torn between threads of two processes on a 2-core machine.
    return {
        **os.environ,
        "COMPRESS_EVAL_DATA_DIR": str(eval_data_dir),
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
    }


def test_two_processes_train_what_one_process_trains(tmp_path, tiny_llama_dir, env):
    parallel = _launch(_recipe(tmp_path, tiny_llama_dir, "two"), 2, env)
    assert parallel.returncode == 0, parallel.stderr[-6000:]
    single = _launch(_recipe(tmp_path, tiny_llama_dir, "one"), 1, env)
    assert single.returncode == 0, single.stderr[-6000:]

    released = tmp_path / "runs" / "release"
    reports = {n: json.loads((released / n / "report.json").read_text()) for n in ("two", "one")}
    details = {n: r["stages"][0]["details"] for n, r in reports.items()}
    assert details["two"]["processes"] == 2 and details["one"]["processes"] == 1
    losses = {n: [p["loss"] for p in d["curve"]] for n, d in details.items()}
    assert losses["two"] == pytest.approx(losses["one"], rel=1e-4)

    source = load_file(tiny_llama_dir / WEIGHTS)
    two, one = (load_file(released / n / WEIGHTS) for n in ("two", "one"))
    for name, original in source.items():
        update = (one[name] - original).abs().max()
        assert update > 0, f"{name}: distillation did not change it"
        # The two runs differ only in how the batch gradient was summed.
        assert (two[name] - one[name]).abs().max() <= 1e-3 * update, name


def test_a_batch_that_does_not_split_evenly_is_refused_before_training(
    tmp_path, tiny_llama_dir, env
):
    result = _launch(_recipe(tmp_path, tiny_llama_dir, "odd", batch_size=3), 2, env)
    assert result.returncode != 0
    assert "batch_size 3: launched on 2 processes" in result.stderr
    assert "distill:" not in result.stderr  # no training step ran
