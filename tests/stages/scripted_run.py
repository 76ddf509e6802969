"""`python -m tests.stages.scripted_run RIGHT ITEMS compress-args...`: the real `compress` CLI in
a process of its own, with lm-eval replaced by the scripted scorer of test_pipeline (the
artifact gets RIGHT of ITEMS items right). Concurrency tests start several of these at once."""

from __future__ import annotations

import sys

from compress.cli import main
from compress.evaluate import lm_eval_runner
from tests.stages.test_pipeline import ScriptedScorer


def run(argv: list[str]) -> int:
    right, items, *command = argv
    scripted = ScriptedScorer(int(right), int(items))
    lm_eval_runner.evaluate_tasks = scripted
    lm_eval_runner.task_item_ids = scripted.item_ids
    # lm-eval's task index takes seconds to build in every new process; the scripted tasks
    # need none of it (their names are checked by the in-process tests).
    lm_eval_runner.check_tasks = lambda eval_cfg: None
    lm_eval_runner.subtask_count = lambda name: int(items)
    return main(command)


if __name__ == "__main__":
    raise SystemExit(run(sys.argv[1:]))
