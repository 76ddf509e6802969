"""Tampered artifacts: 150+ seeded edits of a judged, signed artifact's files, manifest,
report and signature. Every edit of sealed data is caught by `compress verify` (an edit whose
hashes and seal were recomputed, by `verify --key`), `compress.load` refuses what verify
refuses, and no command answers with a traceback (exit 1) or hangs.

Run with `-s` for the table of cases by kind.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

import compress
from compress.artifact import ANNEX_FILES
from compress.cli import main
from compress.errors import EXIT_BAD_INPUT, EXIT_OK, ArtifactError
from compress.seal import MANIFEST, SIGNATURE, sealed
from tests.stages.test_pipeline import (  # noqa: F401  (scorer: a fixture)
    N_ITEMS,
    scorer,
    write_held_out,
    write_recipe,
)

SEED = 20261206
MIN_CASES = 150


@dataclass(frozen=True)
class Case:
    kind: str
    apply: Callable[[Path], None]
    expect: str  # a substring of the error verify logs
    sealed_data: bool = True  # False: an annex file (outside the seal by design)
    only_key_sees_it: bool = False  # hashes and seals recomputed: only a signature can tell
    touches_report: bool = False  # so `gate --replay` must refuse it too


# --------------------------------------------------------------------------- edits


def _rewrite(path: Path, data: bytes) -> None:
    """Replace a hard-linked file by a new one (the pristine artifact keeps its bytes)."""
    path.unlink()
    path.write_bytes(data)


def _manifest(directory: Path) -> dict:
    return json.loads((directory / MANIFEST).read_text())


def _write_manifest(directory: Path, manifest: object, *, reseal: bool = False) -> None:
    if reseal:
        assert isinstance(manifest, dict)
        manifest = sealed(manifest)
    _rewrite(directory / MANIFEST, json.dumps(manifest, indent=2).encode())


def _set_path(data: dict, path: tuple, value: object) -> None:
    for key in path[:-1]:
        data = data[key]
    data[path[-1]] = value


def _file_cases(rng: random.Random, files: list[str]) -> list[Case]:
    cases = []
    for _ in range(40):
        name, fraction = rng.choice(files), rng.random()

        def flip(d: Path, name=name, fraction=fraction) -> None:
            data = bytearray((d / name).read_bytes())
            data[int(fraction * (len(data) - 1))] ^= 0x01
            _rewrite(d / name, bytes(data))

        cases.append(Case("flip one bit of a file", flip, name))
    for _ in range(10):
        name, fraction = rng.choice(files), rng.random()

        def truncate(d: Path, name=name, fraction=fraction) -> None:
            data = (d / name).read_bytes()
            _rewrite(d / name, data[: int(fraction * len(data))])

        cases.append(Case("truncate a file", truncate, name))
    for _ in range(5):
        name = rng.choice(files)
        cases.append(
            Case(
                "append to a file",
                lambda d, name=name: _rewrite(d / name, (d / name).read_bytes() + b"\n"),
                name,
            )
        )
    for name in rng.sample(files, 10):
        cases.append(Case("delete a file", lambda d, name=name: (d / name).unlink(), name))
    for index in range(8):
        extra = rng.choice(["extra.bin", "model.bin", "pytorch_model.bin", ".hidden", "x.py"])
        extra = f"{index}-{extra}"
        cases.append(
            Case(
                "add an unlisted file",
                lambda d, extra=extra: (d / extra).write_bytes(b"payload"),
                f"unlisted file {extra}",
            )
        )
    for name in rng.sample(files, 3):

        def to_directory(d: Path, name=name) -> None:
            (d / name).unlink()
            (d / name).mkdir()

        cases.append(Case("replace a file by a directory", to_directory, name))
    cases.append(Case("add a directory", lambda d: (d / "subdir").mkdir(), "unlisted file subdir"))
    return cases


# Manifest fields a hand edit may change; each must break the seal.
_FIELD_EDITS: list[tuple[tuple, object]] = [
    (("dtype",), "float32"),
    (("dtype",), "float16"),
    (("source", "spec"), "org/other-model"),
    (("source", "sha256"), "0" * 64),
    (("recipe_name",), "renamed"),
    (("recipe_fingerprint",), "f" * 64),
    (("seed",), 7),
    (("stages", 0, "summary"), "nothing happened"),
    (("stages", 0, "seconds"), 0.0),
    (("verdict", "verdict"), "reject"),
    (("verdict", "exit_code"), 3),
    (("verdict", "decided"), "2000-01-01T00:00:00Z"),
    (("created",), "2000-01-01T00:00:00+00:00"),
    (("versions", "torch"), "0.0.1"),
    (("format_version",), 2.0),
]


def _manifest_cases(rng: random.Random, files: list[str]) -> list[Case]:
    cases = []
    for path, value in _FIELD_EDITS:
        cases.append(
            Case(
                "edit a manifest field",
                lambda d, path=path, value=value: _write_manifest(
                    d, _set_path_copy(_manifest(d), path, value)
                ),
                "",  # a seal or schema error, asserted by exit code and MANIFEST below
            )
        )
    for name in rng.sample(files, 8):
        field = rng.choice(["sha256", "bytes"])

        def edit_entry(d: Path, name=name, field=field) -> None:
            manifest = _manifest(d)
            entry = manifest["files"][name]
            entry[field] = "0" * 64 if field == "sha256" else entry["bytes"] + 1
            _write_manifest(d, manifest)

        cases.append(Case("edit a file's entry", edit_entry, "seal does not match"))
    for key in ("dtype", "source", "stages", "verdict"):
        cases.append(
            Case(
                "remove a manifest field",
                lambda d, key=key: _write_manifest(
                    d, {k: v for k, v in _manifest(d).items() if k != key}
                ),
                "seal does not match",
            )
        )
    cases.append(
        Case(
            "add a manifest field",
            lambda d: _write_manifest(d, {**_manifest(d), "trusted": True}),
            "seal does not match",
        )
    )
    structural: list[tuple[str, Callable[[dict], object], str]] = [
        ("files is a list", lambda m: {**m, "files": list(m["files"])}, "files"),
        (
            "an entry lacks sha256",
            lambda m: {
                **m,
                "files": {k: {"bytes": v["bytes"]} for k, v in m["files"].items()},
            },
            "sha256",
        ),
        (
            "bytes is a string",
            lambda m: {
                **m,
                "files": {k: {**v, "bytes": str(v["bytes"])} for k, v in m["files"].items()},
            },
            "bytes",
        ),
        (
            "an entry has an extra key",
            lambda m: {
                **m,
                "files": {k: {**v, "mode": 0o777} for k, v in m["files"].items()},
            },
            "mode",
        ),
        (
            "a file name leaves the directory",
            lambda m: {
                **m,
                "files": {**m["files"], "../../etc/passwd": {"sha256": "0" * 64, "bytes": 1}},
            },
            "not a plain file name",
        ),
        (
            "the manifest lists itself",
            lambda m: {**m, "files": {**m["files"], MANIFEST: {"sha256": "0" * 64, "bytes": 1}}},
            "cannot seal themselves",
        ),
        ("the seal is removed", lambda m: {k: v for k, v in m.items() if k != "seal"}, "seal"),
        (
            "the seal's algorithm is changed",
            lambda m: {**m, "seal": {**m["seal"], "algorithm": "md5"}},
            "seal",
        ),
        ("format 1 (unsealed)", lambda m: {**m, "format_version": 1}, "format 1"),
        ("format_version true", lambda m: {**m, "format_version": True}, "format_version"),
        ("dtype unknown", lambda m: {**m, "dtype": "int3"}, "dtype"),
        (
            "verdict unknown",
            lambda m: {**m, "verdict": {**m["verdict"], "verdict": "maybe"}},
            "verdict",
        ),
        ("the manifest is a list", lambda m: [m], "JSON object"),
    ]
    for kind, edit, expect in structural:
        cases.append(
            Case(
                f"manifest: {kind}",
                lambda d, edit=edit: _write_manifest(d, edit(_manifest(d))),
                expect,
            )
        )
    raw: list[tuple[str, Callable[[bytes], bytes], str]] = [
        ("invalid JSON", lambda b: b[: len(b) // 2], "not valid JSON"),
        ("empty", lambda b: b"", "not valid JSON"),
        ("UTF-16", lambda b: b.decode().encode("utf-16"), "not UTF-8"),
        ("Latin-1 bytes", lambda b: b.replace(b'"dtype"', b'"dtyp\xe9"'), "not UTF-8"),
        ("nested 100,000 deep", lambda b: b"[" * 100_000 + b"]" * 100_000, "not valid JSON"),
        ("17 MB", lambda b: b + b" " * (17 << 20), "over the"),
        ("NaN for a size", lambda b: b.replace(b'"bytes": ', b'"bytes": NaN, "x": ', 1), ""),
    ]
    for kind, edit, expect in raw:
        cases.append(
            Case(
                f"manifest bytes: {kind}",
                lambda d, edit=edit: _rewrite(d / MANIFEST, edit((d / MANIFEST).read_bytes())),
                expect,
            )
        )
    return cases


def _set_path_copy(manifest: dict, path: tuple, value: object) -> dict:
    _set_path(manifest, path, value)
    return manifest


def _resealed_cases(rng: random.Random, files: list[str]) -> list[Case]:
    """The attacker knows the algorithm: edits with every hash and the seal recomputed."""
    cases = []
    for path, value in _FIELD_EDITS[:12]:
        cases.append(
            Case(
                "edit a manifest field and reseal",
                lambda d, path=path, value=value: _write_manifest(
                    d, _set_path_copy(_manifest(d), path, value), reseal=True
                ),
                "signature does not match",
                only_key_sees_it=True,
            )
        )
    for name in rng.sample(files, 4):

        def replace_and_rehash(d: Path, name=name) -> None:
            data = (d / name).read_bytes() + b" "
            _rewrite(d / name, data)
            manifest = _manifest(d)
            manifest["files"][name] = {
                "sha256": hashlib.sha256(data).hexdigest(),
                "bytes": len(data),
            }
            _write_manifest(d, manifest, reseal=True)

        cases.append(
            Case(
                "change a file, rehash and reseal",
                replace_and_rehash,
                "signature does not match",
                only_key_sees_it=True,
                touches_report=name == "report.json",
            )
        )
    return cases


def _report_cases() -> list[Case]:
    def flip_verdict(report: dict) -> dict:
        report["verdict"] = "reject" if report["verdict"] == "ship" else "ship"
        return report

    def drop_items(report: dict) -> dict:
        items = report["evaluation"]["artifact"]["mmlu"]["items"]
        for item in list(items)[: len(items) // 2]:
            items[item] = 0.0
        return report

    def loosen_budget(report: dict) -> dict:
        report["gate_config"]["budgets"]["mmlu"]["max_drop"] = 1.0
        return report

    def shift_quality(report: dict) -> dict:
        windows = report["quality"]["per_window"]
        windows["kl"] = [0.0 for _ in windows["kl"]]
        return report

    cases = []
    for kind, edit in (
        ("flip the verdict", flip_verdict),
        ("zero half the artifact's items", drop_items),
        ("loosen the budget", loosen_budget),
        ("zero the KL windows", shift_quality),
    ):
        for reseal in (False, True):

            def apply(d: Path, edit=edit, reseal=reseal) -> None:
                report = edit(json.loads((d / "report.json").read_text()))
                _rewrite(
                    d / "report.json", json.dumps(sealed(report) if reseal else report).encode()
                )

            label = f"report: {kind}" + (" (report seal recomputed)" if reseal else "")
            cases.append(Case(label, apply, "report.json", touches_report=True))
    return cases


def _signature_cases() -> list[Case]:
    def edit_signature(field: str, value: str) -> Callable[[Path], None]:
        def apply(d: Path) -> None:
            signature = json.loads((d / SIGNATURE).read_text())
            signature[field] = value
            _rewrite(d / SIGNATURE, json.dumps(signature).encode())

        return apply

    return [
        Case(
            "signature: another value",
            edit_signature("signature", "0" * 64),
            "does not match",
            only_key_sees_it=True,
        ),
        Case(
            "signature: another key id",
            edit_signature("key_id", "0" * 16),
            "another key",
            only_key_sees_it=True,
        ),
        Case(
            "signature: another algorithm",
            edit_signature("algorithm", "none"),
            "not a hmac-sha256 signature",
            only_key_sees_it=True,
        ),
        Case(
            "signature: deleted",
            lambda d: (d / SIGNATURE).unlink(),
            "not signed",
            only_key_sees_it=True,
        ),
        Case(
            "signature: not JSON",
            lambda d: _rewrite(d / SIGNATURE, b"\x00garbage"),
            "manifest.sig",
            only_key_sees_it=True,
        ),
    ]


def _annex_cases() -> list[Case]:
    """Files outside the seal by design (documented): adding or editing them is allowed."""
    return [
        Case(
            f"annex: write {name}",
            lambda d, name=name: (d / name).write_text("{}"),
            "",
            sealed_data=False,
        )
        for name in sorted(ANNEX_FILES - {SIGNATURE})
    ]


def tamper_cases(files: list[str]) -> list[Case]:
    rng = random.Random(SEED)
    return [
        *_file_cases(rng, files),
        *_manifest_cases(rng, files),
        *_resealed_cases(rng, files),
        *_report_cases(),
        *_signature_cases(),
        *_annex_cases(),
    ]


# --------------------------------------------------------------------------- the test


@pytest.fixture
def judged_artifact(tmp_path, tiny_llama_dir, scorer) -> tuple[Path, Path]:  # noqa: F811
    """A shipped artifact with quality windows, signed with a key; (artifact, key file)."""
    scorer(artifact_right=N_ITEMS - 1)
    held_out = write_held_out(tmp_path)
    key = tmp_path / "key"
    key.write_text("k" * 64)
    recipe = write_recipe(
        tmp_path,
        tiny_llama_dir,
        eval={
            "tasks": [{"name": "mmlu", "limit": 1}],
            "quality": {"path": str(held_out), "seq_len": 64, "max_windows": 3},
        },
        gate={
            "rule": "point",
            "budgets": {"mmlu": {"max_drop": 0.10}},
            "quality": {"max_kl_divergence": 10.0},
        },
    )
    assert main(["run", str(recipe), "--sign-key", str(key)]) == EXIT_OK
    artifact = tmp_path / "runs" / "release" / "tiny-mixed"
    assert main(["verify", str(artifact), "--key", str(key)]) == EXIT_OK
    return artifact, key


def _copy(source: Path, destination: Path) -> Path:
    shutil.copytree(source, destination, copy_function=os.link)  # edits replace, never write
    return destination


def test_every_edit_of_sealed_data_is_caught(judged_artifact, tmp_path, caplog):
    artifact, key = judged_artifact
    files = sorted(json.loads((artifact / MANIFEST).read_text())["files"])
    cases = tamper_cases(files)
    assert len(cases) >= MIN_CASES
    assert main(["gate", "--replay", str(artifact / "report.json")]) == EXIT_OK
    table: Counter = Counter()
    started = time.perf_counter()
    for index, case in enumerate(cases):
        directory = _copy(artifact, tmp_path / "cases" / str(index))
        case.apply(directory)
        caplog.clear()
        case_start = time.perf_counter()
        with caplog.at_level(logging.ERROR, logger="compress"):
            plain = main(["verify", str(directory)])
            error = caplog.text
            keyed = main(["verify", str(directory), "--key", str(key)])
            inspected = main(["inspect", str(directory)])
            replayed = main(["gate", "--replay", str(directory / "report.json")])
        where = f"case {index} ({case.kind})"
        # Never 1 (a traceback): every answer is "fine" or "bad input".
        assert {plain, keyed, inspected, replayed} <= {EXIT_OK, EXIT_BAD_INPUT}, (
            where,
            caplog.text,
        )
        if not case.sealed_data:
            assert plain == keyed == EXIT_OK, (where, caplog.text)
            table[(case.kind, "allowed (annex)")] += 1
            continue
        assert keyed == EXIT_BAD_INPUT, (where, "verify --key passed")
        if case.only_key_sees_it:
            table[(case.kind, "caught by verify --key")] += 1
        else:
            assert plain == EXIT_BAD_INPUT, (where, "verify passed")
            assert (case.expect or MANIFEST) in error, (where, error)  # names what was edited
            with pytest.raises(ArtifactError):
                compress.load(directory)
            table[(case.kind, "caught by verify and load")] += 1
        if case.touches_report or "manifest" in case.kind or case.expect == "report.json":
            key_args = ["--key", str(key)] if case.only_key_sees_it else []
            code = main(["gate", "--replay", str(directory / "report.json"), *key_args])
            assert code == EXIT_BAD_INPUT, (where, "replay accepted it")
        assert time.perf_counter() - case_start < 10, where
        shutil.rmtree(directory)
    elapsed = time.perf_counter() - started
    print(f"\n{len(cases)} tampered artifacts in {elapsed:.1f} s")
    print("| edit | result | cases |\n|---|---|---|")
    for (kind, result), count in sorted(table.items()):
        print(f"| {kind} | {result} | {count} |")
