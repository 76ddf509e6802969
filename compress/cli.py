"""`compress run | search | gate | report | bench | inspect | verify | export`: argument
parsing and exit codes only."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from compress.errors import EXIT_INTERNAL, EXIT_OK, VERDICT_EXIT, BadInputError, CompressError
from compress.fileio import atomic_write_text

log = logging.getLogger("compress")


def _cmd_search(args: argparse.Namespace) -> int:
    from compress.seal import read_key
    from compress.search.run import search

    sign_key = None if args.sign_key is None else read_key(Path(args.sign_key), "--sign-key")
    outcome = search(args.recipe, resume=args.resume, sign_key=sign_key)
    chosen = outcome.summary.get("chosen")
    result: dict[str, Any] = {
        "verdict": outcome.verdict,
        "exit_code": outcome.exit_code,
        "candidates": len(outcome.summary["candidates"]),
        "chosen_bytes": None
        if chosen is None
        else next(c["bytes"] for c in outcome.summary["candidates"] if c["index"] == chosen),
    }
    if outcome.run is not None:
        result["artifact"] = str(outcome.run.artifact_dir)
        result["report"] = str(outcome.run.artifact_dir / "report.json")
    sys.stdout.write(json.dumps(result) + "\n")
    return outcome.exit_code


def _cmd_run(args: argparse.Namespace) -> int:
    from compress.distill.parallel import from_environment, stop_workers
    from compress.pipeline import run, serve_distillation
    from compress.seal import read_key

    parallel = from_environment()  # under `accelerate launch`: only distillation is shared
    if parallel is not None and not parallel.is_main:
        serve_distillation(args.recipe, parallel)
        return EXIT_OK
    sign_key = None if args.sign_key is None else read_key(Path(args.sign_key), "--sign-key")
    try:
        outcome = run(
            args.recipe, resume=args.resume, parallel=parallel, wait=args.wait, sign_key=sign_key
        )
    finally:
        if parallel is not None:
            stop_workers(parallel)
    sys.stdout.write(
        json.dumps(
            {
                "verdict": outcome.verdict,
                "exit_code": outcome.exit_code,
                "artifact": str(outcome.artifact_dir),
                "report": str(outcome.artifact_dir / "report.json"),
            }
        )
        + "\n"
    )
    return outcome.exit_code


def _cmd_check(args: argparse.Namespace) -> int:
    from compress.pipeline import check

    summary = check(args.recipe)
    sys.stdout.write(json.dumps(summary) + "\n")
    log.info("%s: every check before the model loads passed", args.recipe)
    return EXIT_OK


def _cmd_inspect(args: argparse.Namespace) -> int:
    from compress.artifact import describe_artifact

    sys.stdout.write(json.dumps(describe_artifact(Path(args.path)), indent=2) + "\n")
    return EXIT_OK


def _key(args: argparse.Namespace) -> bytes | None:
    from compress.seal import read_key

    return None if args.key is None else read_key(Path(args.key))


def _cmd_verify(args: argparse.Namespace) -> int:
    from compress.artifact import verify_artifact

    manifest = verify_artifact(Path(args.path), key=_key(args))
    verdict = (manifest.get("verdict") or {}).get("verdict", "not judged")
    signed = ", signature valid" if args.key else ""
    log.info(
        "%s: seal and all %d files match the manifest (verdict: %s%s)",
        args.path,
        len(manifest["files"]),
        verdict,
        signed,
    )
    return EXIT_OK


def _cmd_sign(args: argparse.Namespace) -> int:
    from compress.artifact import verify_artifact
    from compress.seal import SIGNATURE, sign_manifest

    key = _key(args)
    assert key is not None  # --key is required
    verify_artifact(Path(args.path))  # only what verifies is signed
    signature = sign_manifest(Path(args.path), key)
    log.info("%s: %s written (key id %s)", args.path, SIGNATURE, signature["key_id"])
    return EXIT_OK


def _cmd_export(args: argparse.Namespace) -> int:
    out = args.out_option or args.out
    if out is None or (args.out_option and args.out and args.out_option != args.out):
        raise BadInputError("export: name the directory to write once, as OUT or --out DIR")
    if args.format == "onnx":
        from compress.onnx.export import export_onnx

        export_onnx(
            Path(args.path),
            Path(out),
            accuracy_level=args.accuracy_level,
            context_length=args.context_length,
            overwrite=args.overwrite,
        )
    elif args.format == "gguf":
        from compress.gguf.export import export_gguf

        export_gguf(
            Path(args.path), Path(out), tokenizer_pre=args.tokenizer_pre, overwrite=args.overwrite
        )
    else:
        from compress.export import export_artifact

        export_artifact(Path(args.path), Path(out), args.format, overwrite=args.overwrite)
    return EXIT_OK


def _gate_config_and_eval(args: argparse.Namespace) -> tuple[Any, Any]:
    """(gate dict, EvalConfig) from --recipe and/or --budget/--limit/--num-fewshot."""
    from compress.evaluate.release import parse_budgets
    from compress.recipe import EvalConfig, load_recipe

    overrides_budgets = parse_budgets(args.budget)
    if args.recipe is not None:
        recipe = load_recipe(args.recipe)
        gate = recipe.gate.model_dump(mode="json")
        eval_data = recipe.eval.model_dump(mode="json")
        if args.limit is not None:
            eval_data["tasks"] = [{**t, "limit": args.limit} for t in eval_data["tasks"]]
        return gate, _options(EvalConfig, eval_data)
    if not overrides_budgets:
        raise BadInputError("give --recipe R or at least one --budget TASK=DROP")
    tasks = [
        {"name": name, "limit": args.limit, "num_fewshot": args.num_fewshot}
        for name in overrides_budgets
    ]
    return None, _options(EvalConfig, {"tasks": tasks})


def _options(config_type: Any, data: dict[str, Any]) -> Any:
    """A typed config built from command-line options; what it refuses is bad input (exit 2)
    naming the setting (`--limit` sets `tasks[i].limit`)."""
    from pydantic import ValidationError

    from compress.recipe import format_validation_error

    try:
        return config_type.model_validate(data)
    except ValidationError as exc:
        raise BadInputError(
            format_validation_error(exc, "--limit/--num-fewshot", "settings")
        ) from None


def _cmd_gate(args: argparse.Namespace) -> int:
    from compress.evaluate import release

    overrides = release.Overrides(
        release.parse_budgets(args.budget), rule=args.rule, confidence=args.confidence
    )
    if args.replay is not None:
        if args.artifact is not None or args.baseline is not None:
            raise BadInputError("--replay re-decides a stored report: give no ARTIFACT/--baseline")
        report = release.read_report(Path(args.replay), key=_key(args))
        name = report.get("recipe") or Path(args.replay).parent.name
        if args.plan:
            baseline, artifact, _ = release.stored_results(report)
            gate = overrides.apply(report.get("gate_config"))
            return _write_plan(release.plan(baseline, artifact, gate), gate, args)
        decision = release.replay(report, overrides)
        report = {**report, "verdict": decision.verdict, "gate": decision.to_dict()}
        return _write_verdict(report, decision, name, args)
    if args.artifact is None or args.baseline is None:
        raise BadInputError("give ARTIFACT and --baseline MODEL (or --replay REPORT)")
    gate_dict, eval_cfg = _gate_config_and_eval(args)
    gate = overrides.apply(gate_dict)
    report = release.evaluate_against_baseline(
        Path(args.artifact),
        args.baseline,
        eval_cfg,
        gate,
        trust_remote_code=args.trust_remote_code,
        pilot_limit=args.pilot if args.plan else None,
    )
    if args.plan:
        return _write_plan(report["plan"], gate, args)
    decision = release.replay(report, release.Overrides({}))
    return _write_verdict(report, decision, Path(args.artifact).name, args)


def _write_plan(rows: list[dict[str, Any]], gate: Any, args: argparse.Namespace) -> int:
    from compress.evaluate.release import plan_markdown

    payload = json.dumps({"plan": rows}, indent=2) + "\n"
    if args.json is not None:
        atomic_write_text(Path(args.json), payload)
    else:
        sys.stdout.write(payload)
    if args.markdown is not None:
        atomic_write_text(Path(args.markdown), plan_markdown(rows, gate))
    log.info("\n%s", plan_markdown(rows, gate))
    return EXIT_OK


def _write_verdict(
    report: dict[str, Any], decision: Any, name: str, args: argparse.Namespace
) -> int:
    from compress.evaluate.release import junit_xml, markdown_summary
    from compress.seal import sealed

    payload = json.dumps(sealed(report), indent=2) + "\n"  # --replay checks the seal
    if args.json is not None:
        atomic_write_text(Path(args.json), payload)
    else:
        sys.stdout.write(json.dumps({"verdict": decision.verdict, "gate": report["gate"]}) + "\n")
    if args.junit is not None:
        atomic_write_text(Path(args.junit), junit_xml(decision, name))
    summary = markdown_summary(decision, name)
    if args.markdown is not None:
        atomic_write_text(Path(args.markdown), summary)
    log.info("\n%s", summary)
    return VERDICT_EXIT[decision.verdict]


def _cmd_report(args: argparse.Namespace) -> int:
    from compress.evaluate.html import render_sweep_html
    from compress.evaluate.release import read_report

    reports = [read_report(Path(path)) for path in args.reports]
    missing = [p for p, r in zip(args.reports, reports, strict=True) if "gate" not in r]
    if missing:
        raise BadInputError(f"not pipeline reports (no gate decision): {missing}")
    atomic_write_text(Path(args.out), render_sweep_html(reports))
    log.info("%d artifacts → %s", len(reports), args.out)
    return EXIT_OK


def _cmd_bench(args: argparse.Namespace) -> int:
    from compress.bench import BenchSettings, bench_artifact, write_bench_annex

    artifact = Path(args.path)
    settings = BenchSettings(args.prompt_tokens, args.new_tokens, args.repeats)
    if min(settings.prompt_tokens, settings.repeats) < 1 or settings.new_tokens < 2:
        raise BadInputError(
            "--prompt-tokens and --repeats must be at least 1, --new-tokens at least 2"
        )
    section = bench_artifact(artifact, args.baseline, settings, args.runtime)
    write_bench_annex(artifact, args.runtime, section)
    sys.stdout.write(json.dumps(section) + "\n")
    log.info("\n%s", section["table"])
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="compress",
        description="Compress a language model and prove the artifact is still good enough.",
        epilog="exit codes: 0 shipped/ok, 1 internal failure, 2 bad input, 3 rejected by the "
        "gate, 4 inconclusive (not shipped: more items needed)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a recipe end to end: stages, artifact, eval, gate")
    run.add_argument("recipe", help="recipe YAML file")
    run.add_argument(
        "--resume", action="store_true", help="continue an interrupted run of this recipe"
    )
    run.add_argument(
        "--wait",
        action="store_true",
        help="if another run is writing this recipe's name, wait for it (default: exit 2)",
    )
    run.add_argument(
        "--sign-key",
        metavar="FILE",
        help="sign the judged artifact's manifest with this secret key (manifest.sig)",
    )
    run.set_defaults(handler=_cmd_run)

    search = sub.add_parser(
        "search",
        help="the smallest per-layer mix of formats that passes the gate (the recipe's "
        "`search` section), then built, judged and published as `run` does",
    )
    search.add_argument("recipe", help="recipe YAML file with a `search` section")
    search.add_argument(
        "--resume",
        action="store_true",
        help="reuse the sensitivity table measured for the same model, windows and formats",
    )
    search.add_argument(
        "--sign-key", metavar="FILE", help="sign the judged artifact's manifest with this key"
    )
    search.set_defaults(handler=_cmd_search)

    check = sub.add_parser(
        "check",
        help="validate a recipe and everything checkable before the model loads (no run)",
    )
    check.add_argument("recipe", help="recipe YAML file")
    check.set_defaults(handler=_cmd_check)

    gate = sub.add_parser(
        "gate",
        help="judge an artifact against its baseline (or re-decide a stored report)",
        description="Release gate with paired statistics. Exit codes: 0 ship, 3 reject, "
        "4 inconclusive (needs more items; not shipped), 2 bad input.",
    )
    gate.add_argument("artifact", nargs="?", help="artifact directory")
    gate.add_argument("--baseline", help="the uncompressed model (any model source)")
    gate.add_argument("--recipe", help="take eval settings and budgets from this recipe")
    gate.add_argument(
        "--budget",
        action="append",
        default=[],
        metavar="TASK=DROP",
        help="largest allowed drop as a fraction (repeatable; overrides the recipe's)",
    )
    gate.add_argument("--rule", choices=["non_inferiority", "point"], help="rule for every budget")
    gate.add_argument("--confidence", type=float, help="one-sided confidence (default 0.95)")
    gate.add_argument("--limit", type=int, help="items per (sub)task (default: all)")
    gate.add_argument("--num-fewshot", type=int, help="few-shot examples (default: the task's)")
    gate.add_argument("--replay", metavar="REPORT", help="re-decide a report.json, no model run")
    gate.add_argument(
        "--key",
        metavar="FILE",
        help="--replay: also require the manifest beside the report to be signed with this key",
    )
    gate.add_argument(
        "--plan", action="store_true", help="estimate the items each budget needs, from a pilot"
    )
    gate.add_argument(
        "--pilot", type=int, default=20, help="--plan: artifact items per (sub)task to score"
    )
    gate.add_argument("--json", metavar="FILE", help="write the full JSON report here")
    gate.add_argument("--junit", metavar="FILE", help="write a JUnit XML file")
    gate.add_argument("--markdown", metavar="FILE", help="write a markdown summary")
    gate.add_argument(
        "--trust-remote-code", action="store_true", help="allow the baseline's own model code"
    )
    gate.set_defaults(handler=_cmd_gate)

    report = sub.add_parser(
        "report", help="one HTML page comparing artifacts of a sweep: size vs accuracy"
    )
    report.add_argument("reports", nargs="+", help="report.json files of the artifacts")
    report.add_argument("--out", required=True, help="HTML file to write")
    report.set_defaults(handler=_cmd_report)

    bench = sub.add_parser(
        "bench",
        help="prefill / decode speed, peak memory and size of an artifact vs its baseline",
    )
    bench.add_argument("path", help="artifact directory")
    bench.add_argument("--baseline", help="model source (default: the artifact's source)")
    bench.add_argument(
        "--runtime",
        choices=["torch", "onnx"],
        default="torch",
        help="torch: the artifact as compress.load gives it, the baseline in its dtype; onnx: "
        "both exported and run with ONNX Runtime (the baseline unquantized in float32)",
    )
    bench.add_argument("--prompt-tokens", type=int, default=128)
    bench.add_argument("--new-tokens", type=int, default=64)
    bench.add_argument("--repeats", type=int, default=5, help="timed runs (median)")
    bench.set_defaults(handler=_cmd_bench)

    inspect = sub.add_parser("inspect", help="print what an artifact holds (JSON)")
    inspect.add_argument("path")
    inspect.set_defaults(handler=_cmd_inspect)

    verify = sub.add_parser(
        "verify", help="check an artifact's seal and every file's hash against its manifest"
    )
    verify.add_argument("path")
    verify.add_argument("--key", metavar="FILE", help="also check manifest.sig with this key")
    verify.set_defaults(handler=_cmd_verify)

    sign = sub.add_parser(
        "sign", help="sign a verified artifact's manifest with a secret key (manifest.sig)"
    )
    sign.add_argument("path")
    sign.add_argument("--key", metavar="FILE", required=True, help="the secret key's file")
    sign.set_defaults(handler=_cmd_sign)

    export = sub.add_parser(
        "export",
        help="write a verified copy of an artifact in another format",
        description="int-quantized: unpacked int8 codes that stock transformers with "
        "compressed-tensors loads even for asymmetric layers (see compress/export.py); onnx: "
        "an ONNX Runtime decoder with MatMulNBits layers and a KV cache, plus "
        "genai_config.json (see compress/onnx/); gguf: one model.gguf for llama.cpp with the "
        "integer codes carried into Q4_0 / Q4_1 / Q8_0 blocks (see compress/gguf/)",
    )
    export.add_argument("path", help="artifact directory")
    export.add_argument("out", nargs="?", help="directory to write (or --out)")
    export.add_argument("--out", dest="out_option", metavar="DIR", help="directory to write")
    export.add_argument("--format", required=True, choices=["int-quantized", "onnx", "gguf"])
    export.add_argument(
        "--accuracy-level",
        type=int,
        choices=[0, 4],
        default=4,
        help="onnx: MatMulNBits' activation precision; 4 (default) quantizes activations to "
        "int8 per block for the integer dot-product kernels, 0 keeps float32 math",
    )
    export.add_argument(
        "--context-length",
        type=int,
        help="onnx: the longest sequence the export can run (default: the model's maximum, "
        "at most 4096)",
    )
    export.add_argument(
        "--tokenizer-pre",
        metavar="NAME",
        help="gguf: llama.cpp's pre-tokenizer for a byte-level BPE vocabulary whose hash the "
        "export does not know (e.g. llama-bpe, qwen2, smollm)",
    )
    export.add_argument("--overwrite", action="store_true", help="replace `out` if it exists")
    export.set_defaults(handler=_cmd_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    if not args.verbose:
        # lm-eval logs every subtask it builds (hundreds of lines for mmlu); its progress bars
        # and our own summary say what matters.
        logging.getLogger("lm_eval").setLevel(logging.ERROR)
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except CompressError as exc:
        log.error("%s", exc)
        return exc.exit_code
    except Exception:
        log.exception("internal failure (please report it with the log above)")
        return EXIT_INTERNAL


if __name__ == "__main__":
    raise SystemExit(main())
