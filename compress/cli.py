"""`compress run | inspect | verify | export`: argument parsing and exit codes only."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path

from compress.errors import EXIT_INTERNAL, EXIT_OK, CompressError

log = logging.getLogger("compress")


def _cmd_run(args: argparse.Namespace) -> int:
    from compress.distill.parallel import from_environment, stop_workers
    from compress.pipeline import run, serve_distillation

    parallel = from_environment()  # under `accelerate launch`: only distillation is shared
    if parallel is not None and not parallel.is_main:
        serve_distillation(args.recipe, parallel)
        return EXIT_OK
    try:
        outcome = run(args.recipe, resume=args.resume, parallel=parallel)
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


def _cmd_inspect(args: argparse.Namespace) -> int:
    from compress.artifact import describe_artifact

    sys.stdout.write(json.dumps(describe_artifact(Path(args.path)), indent=2) + "\n")
    return EXIT_OK


def _cmd_verify(args: argparse.Namespace) -> int:
    from compress.artifact import verify_artifact

    manifest = verify_artifact(Path(args.path))
    log.info("%s: all %d files match the manifest", args.path, len(manifest["files"]))
    return EXIT_OK


def _cmd_export(args: argparse.Namespace) -> int:
    from compress.export import export_artifact

    export_artifact(Path(args.path), Path(args.out), args.format, overwrite=args.overwrite)
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="compress",
        description="Compress a language model and prove the artifact is still good enough.",
        epilog="exit codes: 0 shipped/ok, 1 internal failure, 2 bad input, 3 rejected by the gate",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a recipe end to end: stages, artifact, eval, gate")
    run.add_argument("recipe", help="recipe YAML file")
    run.add_argument(
        "--resume", action="store_true", help="continue an interrupted run of this recipe"
    )
    run.set_defaults(handler=_cmd_run)

    inspect = sub.add_parser("inspect", help="print what an artifact holds (JSON)")
    inspect.add_argument("path")
    inspect.set_defaults(handler=_cmd_inspect)

    verify = sub.add_parser("verify", help="recompute an artifact's hashes against its manifest")
    verify.add_argument("path")
    verify.set_defaults(handler=_cmd_verify)

    export = sub.add_parser(
        "export",
        help="write a verified copy of an artifact in another format",
        description="int-quantized: unpacked int8 codes that stock transformers with "
        "compressed-tensors loads even for asymmetric layers (see compress/export.py)",
    )
    export.add_argument("path", help="artifact directory")
    export.add_argument("out", help="directory to write")
    export.add_argument("--format", required=True, choices=["int-quantized"])
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
