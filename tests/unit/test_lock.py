"""The run lock with real processes: one holder at a time, the others refused (naming the
holder) or waiting, and a lock left by a killed holder taken over."""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import signal
import time
from pathlib import Path

import pytest

from compress.lock import LockedError, artifact_lock, lock_path

NAME = "tiny"
# fork: the children inherit the imported modules (no interpreter start-up per process), and
# each opens the lock file itself, as separate `compress run` processes do.
FORK = multiprocessing.get_context("fork")


def _hold(root: str, wait: bool, hold_s: float, start_at: float, results) -> None:
    """One contender: take the lock (at `start_at`, to start together), write a marker no
    other holder may see, hold it a while, check the marker is still ours, release."""
    time.sleep(max(0.0, start_at - time.time()))
    marker = Path(root) / "holder"
    try:
        with artifact_lock(Path(root), NAME, wait=wait) as holder:
            marker.write_text(str(os.getpid()))
            time.sleep(hold_s)
            alone = marker.read_text() == str(os.getpid())
            results.put(("held", os.getpid(), alone, holder.pid == os.getpid()))
    except LockedError as exc:
        results.put(("refused", os.getpid(), str(exc), None))


def _contend(root: Path, count: int, *, wait: bool, stagger_s: float = 0.0) -> list[tuple]:
    results = FORK.Queue()
    start = time.time() + 0.3
    procs = [
        FORK.Process(target=_hold, args=(str(root), wait, 0.15, start + i * stagger_s, results))
        for i in range(count)
    ]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=60)
        assert proc.exitcode == 0
    return [results.get(timeout=5) for _ in procs]


@pytest.mark.parametrize("stagger_s", [0.0, 0.05])
def test_one_holder_the_others_refused_naming_it(tmp_path, stagger_s):
    """Started together (and staggered), many rounds: exactly one process holds the lock
    each round, the others exit at once with an error naming the holder's pid."""
    rounds = 12
    for round_index in range(rounds):
        root = tmp_path / f"round{round_index}"
        outcomes = _contend(root, 3, wait=False, stagger_s=stagger_s)
        held = [o for o in outcomes if o[0] == "held"]
        refused = [o for o in outcomes if o[0] == "refused"]
        assert len(held) == 1, outcomes
        assert held[0][2] and held[0][3]  # nobody else wrote the marker while it held
        holder_pid = held[0][1]
        for _, _, message, _ in refused:
            assert f"pid {holder_pid}" in message and "--wait" in message
        # Released cleanly: the file stays (see compress/lock.py) with an empty record.
        assert lock_path(root, NAME).read_text() == ""


def test_wait_serializes_every_holder(tmp_path):
    outcomes = _contend(tmp_path, 4, wait=True)
    assert [o[0] for o in outcomes] == ["held"] * 4
    assert all(alone for _, _, alone, _ in outcomes)


def _hold_forever(root: str, ready) -> None:
    with artifact_lock(Path(root), NAME):
        ready.set()
        time.sleep(600)


def test_a_killed_holder_leaves_a_stale_lock_that_is_taken_over(tmp_path, caplog):
    ready = FORK.Event()
    proc = FORK.Process(target=_hold_forever, args=(str(tmp_path), ready))
    proc.start()
    assert ready.wait(30)
    record = json.loads(lock_path(tmp_path, NAME).read_text())
    assert record["pid"] == proc.pid
    with pytest.raises(LockedError, match=f"pid {proc.pid} on "), artifact_lock(tmp_path, NAME):
        pass
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(timeout=30)
    with (
        caplog.at_level(logging.WARNING, logger="compress.lock"),
        artifact_lock(tmp_path, NAME) as holder,
    ):
        assert holder.pid == os.getpid()
    assert f"pid {proc.pid}" in caplog.text and "ended without releasing" in caplog.text


def test_the_lock_is_per_name_and_per_output_directory(tmp_path):
    with artifact_lock(tmp_path / "a", NAME):
        with artifact_lock(tmp_path / "a", "other"), artifact_lock(tmp_path / "b", NAME):
            pass
        with pytest.raises(LockedError), artifact_lock(tmp_path / "a", NAME):
            pass
