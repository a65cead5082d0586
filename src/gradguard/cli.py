"""The ``gradguard`` command line: demo, report, watch, diagnose, export.

Exit codes: 0 ok; 1 findings (``diagnose``) or a problem while running; 2 usage or
input errors (bad arguments, a missing directory, no run store, a corrupt file).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from . import __version__

EXIT_OK, EXIT_FINDINGS, EXIT_USAGE = 0, 1, 2


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gradguard", description="Measure, diagnose and guard neural-network gradients."
    )
    parser.add_argument("--version", action="version", version=f"gradguard {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = commands.add_parser(
        "demo",
        help="gradients vanishing and exploding, then one run with bad batches, unguarded and "
        "guarded, compared in an HTML report",
        description="The efficacy experiments are a separate command in a source checkout: "
        "python -m benchmarks.efficacy.",
    )
    demo.add_argument("--steps", type=int, default=600, help="training steps per run")
    demo.add_argument(
        "--out",
        metavar="DIR",
        default="gradguard-demo",
        help="where the runs and their comparison report go (default ./gradguard-demo)",
    )

    report = commands.add_parser(
        "report",
        help="write a self-contained HTML report of a recorded run, or compare several runs",
        description="Write one offline, interactive HTML file for a run: verdict, linked "
        "charts, per-layer heatmap, findings, events, metadata. Give several runs to "
        "overlay them on the same axes with a side-by-side summary.",
    )
    report.add_argument(
        "run_dirs", nargs="+", metavar="RUN_DIR", help="run directory or gradguard.db file"
    )
    report.add_argument(
        "--out",
        metavar="FILE",
        help="output file (default RUN_DIR/report.html; for several runs, compare.html in "
        "their common parent directory)",
    )
    report.add_argument(
        "--label", action="append", metavar="NAME", help="a run's name in the report (once per run)"
    )
    report.add_argument(
        "--rules",
        action="store_true",
        help="replay the health rules over the whole run (~100 s per million steps) "
        "instead of showing the findings recorded while training",
    )

    watch = commands.add_parser(
        "watch",
        help="live terminal view of a run while it is being recorded",
        description="Show step, norm, clip rate, a sparkline, findings and events; Ctrl-C stops.",
    )
    watch.add_argument("run_dir", metavar="RUN_DIR", help="run directory or gradguard.db file")
    watch.add_argument(
        "--interval",
        type=_positive_float,
        default=2.0,
        metavar="S",
        help="seconds between frames (default 2)",
    )
    watch.add_argument("--once", action="store_true", help="print one frame and exit")

    diag = commands.add_parser(
        "diagnose",
        help="probe a model's gradients with a few forward/backward passes",
        description=(
            "Import FACTORY (MODULE:FUNCTION, MODULE dotted or a .py path). The function takes "
            "no arguments and returns (model, batch, loss_fn): batch is a tuple (inputs..., "
            "target), the model is called as model(*inputs), and loss_fn(model_output, target) "
            "returns the scalar loss. No optimizer step is taken. Exit 0 healthy, 1 when a "
            "warning or critical finding is made, 2 on usage errors."
        ),
    )
    diag.add_argument("factory", metavar="MODULE:FACTORY")
    diag.add_argument(
        "--steps", type=_positive_int, default=5, help="forward/backward passes (default 5)"
    )

    export = commands.add_parser(
        "export",
        help="export a run's steps (or snapshot norms) as csv, jsonl or parquet",
        description="parquet needs pandas and pyarrow. Non-finite values: empty/null for NaN, "
        "'inf'/'-inf' for infinities.",
    )
    export.add_argument("run_dir", metavar="RUN_DIR", help="run directory or gradguard.db file")
    export.add_argument("--format", required=True, choices=("csv", "parquet", "jsonl"))
    export.add_argument(
        "--out", metavar="FILE", help="output file, '-' for stdout (default RUN_DIR/steps.FORMAT)"
    )
    export.add_argument(
        "--tensors",
        action="store_true",
        help="export per-tensor snapshot norms in long format (step, name, norm)",
    )
    return parser


def _fail(message: str, code: int = EXIT_USAGE) -> int:
    print(f"gradguard: error: {message}", file=sys.stderr)
    return code


def _run(args: argparse.Namespace) -> int:
    if args.command == "report":
        from .report import build_report

        if args.label is not None and len(args.label) != len(args.run_dirs):
            return _fail(f"--label: give one per run ({len(args.run_dirs)}), got {len(args.label)}")
        path = build_report(args.run_dirs, args.out, labels=args.label, rules=args.rules or None)
        print(f"wrote {path} ({path.stat().st_size / 1e3:.0f} kB): {path.resolve().as_uri()}")
        return EXIT_OK
    if args.command == "watch":
        from .watch import watch

        return watch(args.run_dir, args.interval, args.once)
    if args.command == "diagnose":
        from .diagnose import load_factory, probe, report

        result = probe(load_factory(args.factory), args.steps)
        print(report(result))
        return result.exit_code
    if args.command == "export":
        from .export import export

        where = export(args.run_dir, args.format, args.out, args.tensors)
        if where != "-":
            print(f"wrote {where}")
        return EXIT_OK
    raise AssertionError(args.command)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "demo":
        if args.steps < 500:
            parser.error("--steps must be at least 500: the bad batches come at steps 300-450")
        from .demo import main as demo_main

        return demo_main(args.steps, out=args.out)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    from .diagnose import ProbeError
    from .export import ExportError
    from .record.store import StoreError

    try:
        return _run(args)
    except (StoreError, ProbeError) as e:
        return _fail(str(e))
    except ExportError as e:
        return _fail(str(e))
    except BrokenPipeError:  # e.g. `gradguard export ... --out - | head`
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - silence the flush at exit
        return EXIT_OK
    except OSError as e:
        return _fail(f"{e.strerror or e}: {e.filename or ''}".rstrip(": "))
    except KeyboardInterrupt:
        return EXIT_FINDINGS


if __name__ == "__main__":
    sys.exit(main())
