"""Hostile recipes: every malformed file exits 2 with one error naming the file and the field.

tests/fuzz_recipes.py mutates two valid recipes built here from real local inputs (the tiny
random Llama, calibration and held-out text in tmp_path), which `compress check` passes (exit
0), so each case is one mutation away from a recipe that works. Each case runs
`compress check` in-process, as a release pipeline would run it, and must exit 2 (never 1,
never an exception) with one error, in well under a second. `-s` prints a summary by kind.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from compress.cli import main
from compress.errors import EXIT_BAD_INPUT, EXIT_OK
from tests.fuzz_recipes import (
    SPECS,
    Case,
    dump,
    generalize,
    leaves_and_nodes,
    mutations,
    names_expected,
    pre_model_mutations,
)

SECONDS_PER_CASE = 5.0  # generous: a case takes milliseconds; a hang or a parse of MBs does not
MIN_CASES = 300


@dataclass(frozen=True)
class Inputs:
    model_dir: Path
    calibration: Path
    held_out: Path
    output: Path


def quantize_base(inputs: Inputs) -> dict[str, Any]:
    """GPTQ INT4 on the MLPs and RTN INT8 on attention, two gated tasks and a quality gate."""
    return {
        "version": 1,
        "name": "fuzz-int4",
        "model": {"source": str(inputs.model_dir), "trust_remote_code": False},
        "dtype": "bfloat16",
        "calibration": {
            "path": str(inputs.calibration),
            "num_samples": 4,
            "seq_len": 32,
            "seed": 0,
            "batch_size": 2,
            "device": "cpu",
        },
        "stages": [
            {
                "type": "quantize",
                "method": "gptq",
                "bits": 4,
                "group_size": 32,
                "symmetric": False,
                "observer": "mse",
                "include": ["*.mlp.*"],
                "exclude": ["*.down_proj"],
                "gptq": {"damp_percent": 0.01, "block_size": 128, "act_order": True},
            },
            {
                "type": "quantize",
                "method": "rtn",
                "bits": 8,
                "group_size": -1,
                "symmetric": True,
                "include": ["*.self_attn.*"],
            },
        ],
        "eval": {
            "tasks": [
                {"name": "mmlu", "limit": 1, "num_fewshot": 0, "metric": "acc"},
                {"name": "gsm8k", "limit": 2, "num_fewshot": 0, "max_gen_toks": 16},
            ],
            "quality": {"path": str(inputs.held_out), "seq_len": 32, "max_windows": 3},
            "batch_size": 1,
            "seed": 1234,
        },
        "gate": {
            "rule": "point",
            "confidence": 0.95,
            "power": 0.8,
            "budgets": {
                "mmlu": {"max_drop": 0.1, "rule": "point"},
                "gsm8k": {"max_drop": 0.1},
            },
            "quality": {
                "max_kl_divergence": 0.5,
                "max_perplexity_increase": 0.2,
                "min_top1_agreement": 0.5,
                "rule": "non_inferiority",
            },
        },
        "output": {"dir": str(inputs.output)},
    }


def prune_distill_base(inputs: Inputs) -> dict[str, Any]:
    """Prune heads, FFN channels and a layer, distil with QAT, then quantize to INT4."""
    base = quantize_base(inputs)
    base["name"] = "fuzz-prune-distill"
    base["stages"] = [
        {
            "type": "prune",
            "criterion": "activation",
            "norm": 2,
            "heads": {"unit": "query", "keep": 2},
            "ffn": {"ratio": 0.25, "multiple_of": 32},
            "layers": {"indices": [1], "criterion": "cosine"},
        },
        {
            "type": "distill",
            "teacher": str(inputs.model_dir),
            "temperature": 2.0,
            "alpha": 0.5,
            "hidden": {"layers": [0], "teacher_layers": [0], "loss": "mse", "weight": 1.0},
            "synthetic": {"num_sequences": 4, "length": 16, "temperature": 1.0, "batch_size": 2},
            "steps": 2,
            "batch_size": 2,
            "grad_accumulation": 1,
            "lr": 0.0001,
            "weight_decay": 0.0,
            "warmup_steps": 1,
            "min_lr_ratio": 0.1,
            "max_grad_norm": 1.0,
            "autocast": "none",
            "seed": 0,
            "device": "cpu",
            "teacher_device": "cpu",
            "checkpoint_every": 1,
            "qat": {"bits": 4, "group_size": 32, "symmetric": False, "observer": "minmax"},
        },
        {"type": "quantize", "bits": 4, "group_size": 32, "symmetric": False},
    ]
    return base


@pytest.fixture
def inputs(tmp_path, tiny_llama_dir, monkeypatch) -> Inputs:
    # Sizes as in tests/stages/test_pipeline.py: 4 windows of 32 calibration tokens, and
    # held-out text for 3 windows of 32.
    monkeypatch.delenv("COMPRESS_EVAL_DATA_DIR", raising=False)
    calibration = tmp_path / "calibration.txt"
    calibration.write_text("Calibration text about many different things, numbers 1 2 3. " * 300)
    held_out = tmp_path / "held_out.txt"
    held_out.write_text("The quick brown fox jumps over the lazy dog. " * 200)
    return Inputs(tiny_llama_dir, calibration, held_out, tmp_path / "runs")


@pytest.fixture
def bases(inputs) -> dict[str, dict[str, Any]]:
    return {"quantize": quantize_base(inputs), "prune-distill": prune_distill_base(inputs)}


# --------------------------------------------------------------------------- running a case


@dataclass(frozen=True)
class Outcome:
    case: Case
    base: str
    rc: int | None
    errors: tuple[str, ...]  # the messages logged at ERROR
    traceback: bool  # an ERROR record carried exc_info (an internal failure's traceback)
    raised: str | None  # an exception main() let through
    seconds: float
    names_file: bool
    names_field: bool

    def problems(self) -> list[str]:
        found = []
        if self.raised is not None:
            found.append(f"raised {self.raised}")
        if self.rc != EXIT_BAD_INPUT:
            found.append(f"exit code {self.rc}, not {EXIT_BAD_INPUT}")
        if self.traceback:
            found.append("logged a traceback")
        if len(self.errors) != 1:
            found.append(f"{len(self.errors)} errors logged, not 1")
        if self.errors and not self.names_file:
            found.append("the error does not name the file")
        if self.errors and not self.names_field:
            what = "field" if self.case.is_field else "reason"
            found.append(f"the error does not name the {what} {self.case.expect!r}")
        if self.seconds > SECONDS_PER_CASE:
            found.append(f"took {self.seconds:.1f} s")
        return found


def run_check(path: Path, caplog: pytest.LogCaptureFixture) -> tuple[int | None, str | None]:
    caplog.clear()
    try:
        return main(["check", str(path)]), None
    except BaseException as exc:  # SystemExit included: nothing may escape main()
        return None, f"{type(exc).__name__}: {exc}"[:300]


def run_case(case: Case, base: str, path: Path, caplog: pytest.LogCaptureFixture) -> Outcome:
    path.write_bytes(case.data)
    start = time.perf_counter()
    rc, raised = run_check(path, caplog)
    seconds = time.perf_counter() - start
    records = [
        r for r in caplog.records if r.levelno >= logging.ERROR and r.name.startswith("compress")
    ]
    errors = tuple(r.getMessage() for r in records)
    message = "\n".join(errors)
    return Outcome(
        case=case,
        base=base,
        rc=rc,
        errors=errors,
        traceback=any(r.exc_info for r in records),
        raised=raised,
        seconds=seconds,
        names_file=str(path) in message,
        names_field=names_expected(message, case),
    )


def run_all(
    cases: Iterable[tuple[str, Case]], directory: Path, caplog: pytest.LogCaptureFixture
) -> list[Outcome]:
    directory.mkdir(parents=True, exist_ok=True)
    return [
        run_case(case, base, directory / f"{index:04d}-recipe.yaml", caplog)
        for index, (base, case) in enumerate(cases)
    ]


def summarize(title: str, outcomes: list[Outcome]) -> str:
    """A table by mutation kind: cases, exit codes, errors naming the file and the field."""
    rows: dict[str, list[Outcome]] = defaultdict(list)
    for outcome in outcomes:
        rows[outcome.case.kind].append(outcome)
    header = f"{'kind':<16} {'cases':>5} {'exit codes':<18} {'file':>5} {'field':>5} {'max s':>6}"
    lines = [title, header, "-" * len(header)]
    for kind, group in [*sorted(rows.items()), ("total", outcomes)]:
        codes = Counter("raised" if o.raised else str(o.rc) for o in group)
        shown = " ".join(f"{code}:{n}" for code, n in sorted(codes.items()))
        lines.append(
            f"{kind:<16} {len(group):>5} {shown:<18} {sum(o.names_file for o in group):>5} "
            f"{sum(o.names_field for o in group):>5} {max(o.seconds for o in group):>6.2f}"
        )
    total = math.fsum(o.seconds for o in outcomes)
    lines.append(f"{len(outcomes)} cases in {total:.1f} s")
    return "\n".join(lines)


def failure_report(outcomes: list[Outcome], limit: int = 40) -> str:
    failed = [o for o in outcomes if o.problems()]
    lines = [f"{len(failed)} of {len(outcomes)} cases failed:"]
    for outcome in failed[:limit]:
        first = outcome.errors[0] if outcome.errors else "(nothing logged)"
        lines.append(
            f"- [{outcome.base}] {outcome.case.kind}:{outcome.case.name}: "
            f"{'; '.join(outcome.problems())}\n    {first[:400]!r}"
        )
    return "\n".join(lines)


def check_base(base: dict[str, Any], path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path.write_bytes(dump(base))
    rc, raised = run_check(path, caplog)
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert raised is None and rc == EXIT_OK, (rc, raised, errors)


# --------------------------------------------------------------------------- the tests


def test_base_recipes_pass_check(bases, tmp_path, caplog):
    for label, base in bases.items():
        check_base(base, tmp_path / f"{label}.yaml", caplog)


def test_generator_is_seeded_and_covers_every_number():
    placeholder = Inputs(Path("/m"), Path("/c.txt"), Path("/h.txt"), Path("/runs"))
    base = quantize_base(placeholder)
    cases = list(mutations(base, seed=7))
    assert len(cases) >= MIN_CASES
    ids = [f"{c.kind}:{c.name}" for c in cases]
    assert len(set(ids)) == len(ids), [i for i, n in Counter(ids).items() if n > 1]
    # Seeded: the same seed gives the same bytes; another seed changes the random parts.
    assert [c.data for c in mutations(base, seed=7)] == [c.data for c in cases]
    assert [c.data for c in mutations(base, seed=8)] != [c.data for c in cases]
    # Every number in both bases has out-of-range cases: a bound missing from the schema
    # then fails a case instead of going untested.
    for recipe in (base, prune_distill_base(placeholder)):
        for loc, value in leaves_and_nodes(recipe):
            number = isinstance(value, int | float) and not isinstance(value, bool)
            if number and loc != ("version",):
                spec = SPECS.get(generalize(loc))
                assert spec is not None and spec.invalid, f"no out-of-range cases for {loc}"


def test_schema_mutations(bases, tmp_path, caplog):
    """Refused by the loader and the schema: no model, no data is touched."""
    # The second base differs from the first in its stages only: its other cases would repeat.
    cases = [("quantize", case) for case in mutations(bases["quantize"], seed=0)]
    assert len(cases) >= MIN_CASES
    cases += [
        ("prune-distill", case)
        for case in mutations(bases["prune-distill"], seed=0, within="stages")
    ]
    outcomes = run_all(cases, tmp_path / "cases", caplog)
    print("\n" + summarize("schema-level mutations (compress check → exit 2)", outcomes))
    assert not any(o.problems() for o in outcomes), failure_report(outcomes)
    assert math.fsum(o.seconds for o in outcomes) < 60


def test_pre_model_mutations(bases, inputs, tmp_path, caplog, monkeypatch):
    """Accepted by the schema, refused by the checks `compress check` makes before the model
    loads (output directory, sources, texts, group sizes against the model's config, limits)."""
    # As a release pipeline without network access runs: a Hub id must be in the local cache
    # (with network access, transformers would try the Hub, retrying, before failing).
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    base = bases["quantize"]
    check_base(base, tmp_path / "base.yaml", caplog)  # also warms lm-eval's task index (~7 s)
    cases = [("quantize", case) for case in pre_model_mutations(base, tmp_path / "scratch")]
    outcomes = run_all(cases, tmp_path / "cases", caplog)
    print("\n" + summarize("pre-model mutations (compress check → exit 2)", outcomes))
    assert not any(o.problems() for o in outcomes), failure_report(outcomes)
