"""`compress gate`: replay equality, budget overrides, planning, JUnit / markdown outputs, exit
codes and bad input, on reports of the tiny pipeline (lm-eval replaced by a scripted scorer)."""

from __future__ import annotations

import json
from pathlib import Path
from xml.etree import ElementTree

import pytest

from compress import pipeline
from compress.cli import main
from compress.errors import EXIT_BAD_INPUT, EXIT_INCONCLUSIVE, EXIT_OK, EXIT_REJECTED
from compress.seal import sealed
from tests.stages.test_pipeline import scorer, write_recipe  # noqa: F401  (fixture)

ITEMS = 1000
GATE = {"budgets": {"mmlu": {"max_drop": 0.05}, "gsm8k": {"max_drop": 0.05}}}
EVAL = {"tasks": [{"name": "mmlu", "limit": 3}, {"name": "gsm8k", "limit": 3}]}


@pytest.fixture
def shipped_report(tmp_path, tiny_llama_dir, scorer) -> Path:  # noqa: F811
    scorer(artifact_right=ITEMS - 10, n_items=ITEMS)  # a 1-point drop on 1,000 items
    outcome = pipeline.run(write_recipe(tmp_path, tiny_llama_dir, gate=GATE, eval=EVAL))
    assert outcome.verdict == "ship"
    return outcome.artifact_dir / "report.json"


def test_replay_decides_exactly_what_the_run_decided(shipped_report, tmp_path):
    out, junit, markdown = tmp_path / "gate.json", tmp_path / "gate.xml", tmp_path / "gate.md"
    outputs = ["--json", str(out), "--junit", str(junit), "--markdown", str(markdown)]
    code = main(["gate", "--replay", str(shipped_report), *outputs])
    assert code == EXIT_OK
    stored = json.loads(shipped_report.read_text())
    replayed = json.loads(out.read_text())
    assert replayed["gate"] == stored["gate"] and replayed["verdict"] == "ship"
    suite = ElementTree.parse(junit).getroot()
    assert suite.get("tests") == "2" and suite.get("failures") == "0"
    assert "| mmlu | acc | 1000 |" in markdown.read_text()


def test_a_tighter_budget_rejects_and_fails_the_junit_case(shipped_report, tmp_path):
    junit = tmp_path / "gate.xml"
    code = main(
        ["gate", "--replay", str(shipped_report), "--budget", "mmlu=0.001", "--junit", str(junit)]
    )
    assert code == EXIT_REJECTED
    failures = ElementTree.parse(junit).getroot().findall("./testcase/failure")
    assert [f.get("type") for f in failures] == ["reject"]


def test_a_budget_near_the_drop_is_inconclusive(shipped_report, capsys):
    code = main(["gate", "--replay", str(shipped_report), "--budget", "mmlu=0.012"])
    assert code == EXIT_INCONCLUSIVE
    verdict = json.loads(capsys.readouterr().out)
    mmlu = next(t for t in verdict["gate"]["tasks"] if t["task"] == "mmlu")
    assert mmlu["outcome"] == "inconclusive" and mmlu["needed"] > ITEMS


def test_plan_from_stored_items(shipped_report, capsys):
    assert main(["gate", "--replay", str(shipped_report), "--plan"]) == EXIT_OK
    rows = {r["task"]: r for r in json.loads(capsys.readouterr().out)["plan"]}
    mmlu = rows["mmlu"]
    assert mmlu["pilot_items"] == ITEMS and mmlu["discordance"] == pytest.approx(0.01)
    # 1-point drop against a 5-point budget with 1 % discordance: a few dozen items decide.
    assert 10 < mmlu["needed_at_pilot_drop"] < 200 < ITEMS


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda r: r["evaluation"]["artifact"]["mmlu"]["items"].popitem(), "different items"),
        (
            lambda r: r["evaluation"]["artifact"]["mmlu"]["info"].update(task_versions={"m": 2}),
            "evaluated differently (task_versions",
        ),
    ],
)
def test_replay_refuses_results_that_do_not_pair(shipped_report, tmp_path, caplog, edit, message):
    report = json.loads(shipped_report.read_text())
    edit(report)
    edited = tmp_path / "edited.json"
    edited.write_text(json.dumps(report))
    assert main(["gate", "--replay", str(edited)]) == EXIT_BAD_INPUT
    assert "seal does not match" in caplog.text  # a hand edit is caught first
    # Even a report whose seal was recomputed (its writer was not the gate) must pair.
    edited.write_text(json.dumps(sealed(report)))
    assert main(["gate", "--replay", str(edited)]) == EXIT_BAD_INPUT
    assert message in caplog.text


def test_a_forged_report_does_not_replay(shipped_report, tmp_path, caplog):
    """The attack: the artifact's own report.json edited to turn its verdict around."""
    report = json.loads(shipped_report.read_text())
    items = report["evaluation"]["artifact"]["mmlu"]["items"]
    for item in list(items)[:300]:
        items[item] = 0.0  # a 30-point drop: a replay would reject
    shipped_report.write_text(json.dumps(report))
    assert main(["gate", "--replay", str(shipped_report)]) == EXIT_BAD_INPUT
    assert "seal does not match" in caplog.text
    # Recomputing the report's own seal does not help inside an artifact: its manifest
    # sealed the report's bytes, and verify fails too.
    shipped_report.write_text(json.dumps(sealed(report)))
    assert main(["gate", "--replay", str(shipped_report)]) == EXIT_BAD_INPUT
    assert "differs from the report sealed in" in caplog.text
    assert main(["verify", str(shipped_report.parent)]) == EXIT_BAD_INPUT


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--budget", "mmlu"], "--budget 'mmlu': expected TASK=DROP"),
        (["--budget", "mmlu=-1"], "--budget 'mmlu=-1'"),
        (["--budget", "arc=0.1"], "budgets for tasks the report did not score: ['arc']"),
        (["--confidence", "1.5"], "confidence"),
    ],
)
def test_bad_budgets_exit_2(shipped_report, caplog, args, message):
    assert main(["gate", "--replay", str(shipped_report), *args]) == EXIT_BAD_INPUT
    assert message in caplog.text


def test_live_gate_scores_both_models(tmp_path, tiny_llama_dir, shipped_report, scorer):  # noqa: F811
    scripted = scorer(artifact_right=ITEMS, n_items=ITEMS)
    artifact = shipped_report.parent
    out = tmp_path / "live.json"
    options = ["--budget", "mmlu=0.05", "--limit", "2", "--json", str(out)]
    code = main(["gate", str(artifact), "--baseline", str(tiny_llama_dir), *options])
    assert code == EXIT_OK
    assert [label for label, _ in scripted.calls] == ["baseline", "artifact"]
    report = json.loads(out.read_text())
    assert report["verdict"] == "ship" and report["gate_config"]["budgets"]["mmlu"]
    # What the live gate wrote replays to the same decision.
    assert main(["gate", "--replay", str(out), "--json", str(tmp_path / "again.json")]) == 0
    assert json.loads((tmp_path / "again.json").read_text())["gate"] == report["gate"]


def test_live_gate_checks_its_input_before_loading_models(tmp_path, tiny_llama_dir, caplog):
    code = main(["gate", str(tmp_path / "nothing"), "--baseline", str(tiny_llama_dir)])
    assert code == EXIT_BAD_INPUT
    assert "--recipe R or at least one --budget" in caplog.text
    code = main(
        [
            "gate",
            str(tmp_path / "nothing"),
            "--baseline",
            str(tiny_llama_dir),
            "--budget",
            "mmlu=0.1",
        ]
    )
    assert code == EXIT_BAD_INPUT
    assert "not an artifact directory" in caplog.text


def test_sweep_page_compares_artifacts(shipped_report, tmp_path):
    other = json.loads(shipped_report.read_text())
    other["recipe"], other["verdict"] = "smaller", "reject"
    other["sizes"]["artifact_bytes"] //= 2
    second = tmp_path / "second.json"
    second.write_text(json.dumps(sealed(other)))
    page = tmp_path / "sweep.html"
    assert main(["report", str(shipped_report), str(second), "--out", str(page)]) == EXIT_OK
    text = page.read_text()
    assert "Sweep of 2 artifacts" in text and "data:image/png;base64," in text
    assert text.index("<td>smaller</td>") < text.index("<td>tiny-mixed</td>")  # by size
