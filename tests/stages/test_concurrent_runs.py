"""Two `compress run` of one recipe into one output directory, as real processes started
together and staggered: one writer at a time (the other exits 2 naming it, or waits with
--wait), and the verdict folder always holds a complete, verified, judged artifact.

lm-eval is replaced by the scripted scorer in each process (tests/stages/scripted_run.py);
everything else is the real CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from compress.artifact import verify_artifact
from compress.errors import EXIT_BAD_INPUT, EXIT_OK, EXIT_REJECTED
from compress.lock import lock_path
from tests.conftest import REPO
from tests.stages.test_pipeline import N_ITEMS, write_recipe

NAME = "tiny-mixed"  # write_recipe's name


def _start(recipe: Path, right: int, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COMPRESS_EVAL_DATA_DIR": ""}
    command = [sys.executable, "-m", "tests.stages.scripted_run", str(right), str(N_ITEMS)]
    return subprocess.Popen(
        [*command, "run", str(recipe), *extra],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finish(proc: subprocess.Popen) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode in (EXIT_OK, EXIT_BAD_INPUT, EXIT_REJECTED), err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    return proc.returncode, out, err


def _wait_for_holder(root: Path, proc: subprocess.Popen) -> None:
    """Until `proc` holds the lock (its record is in the lock file)."""
    path = lock_path(root, NAME)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if path.is_file() and path.read_text().strip():
            return
        time.sleep(0.02)
    raise AssertionError(f"the first run never took the lock: {proc.communicate()[1][-3000:]}")


def _check_outcome(root: Path, results: list[tuple[int, str, str]], verdict: str) -> None:
    """Whatever the interleaving: the writers that finished say where a complete artifact is,
    the refused ones name the holder, and the verdict folder verifies in full."""
    folder = root / {"ship": "release", "reject": "rejected"}[verdict] / NAME
    finished = [r for r in results if r[0] != EXIT_BAD_INPUT]
    assert finished, [r[2][-2000:] for r in results]
    for _, out, _ in finished:
        line = json.loads(out.strip().splitlines()[-1])
        assert line["verdict"] == verdict and Path(line["artifact"]) == folder
        assert Path(line["report"]).is_file()
    for code, _, err in results:
        if code == EXIT_BAD_INPUT:
            assert "another compress run is writing this artifact: pid" in err
    manifest = verify_artifact(folder)
    assert manifest["verdict"]["verdict"] == verdict
    assert {"model.safetensors", "report.json", "report.html", "README.md"} <= set(
        manifest["files"]
    )
    assert not (root / "work" / NAME).exists()
    leftovers = [p.name for p in folder.parent.iterdir() if p.name != NAME]
    assert leftovers == [], leftovers


@pytest.mark.parametrize("round_index", range(3))
def test_started_together(tmp_path, tiny_llama_dir, round_index):
    recipe = write_recipe(tmp_path, tiny_llama_dir)
    procs = [_start(recipe, N_ITEMS - 1) for _ in range(2)]
    results = [_finish(p) for p in procs]
    _check_outcome(tmp_path / "runs", results, "ship")


@pytest.mark.parametrize(("right", "verdict"), [(N_ITEMS - 1, "ship"), (0, "reject")])
def test_second_started_while_the_first_holds_the_lock(tmp_path, tiny_llama_dir, right, verdict):
    recipe = write_recipe(tmp_path, tiny_llama_dir)
    first = _start(recipe, right)
    _wait_for_holder(tmp_path / "runs", first)
    second = _start(recipe, right)
    refused = _finish(second)
    assert refused[0] == EXIT_BAD_INPUT  # at once, while the first still runs
    assert f"pid {first.pid} on" in refused[2]
    results = [_finish(first), refused]
    assert results[0][0] == (EXIT_OK if verdict == "ship" else EXIT_REJECTED)
    _check_outcome(tmp_path / "runs", results, verdict)


def test_wait_runs_one_after_the_other(tmp_path, tiny_llama_dir):
    recipe = write_recipe(tmp_path, tiny_llama_dir)
    first = _start(recipe, N_ITEMS - 1, "--wait")
    _wait_for_holder(tmp_path / "runs", first)
    second = _start(recipe, N_ITEMS - 1, "--wait")
    results = [_finish(first), _finish(second)]
    assert [r[0] for r in results] == [EXIT_OK, EXIT_OK]
    assert "waiting for pid" in results[1][2]
    _check_outcome(tmp_path / "runs", results, "ship")
