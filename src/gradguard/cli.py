"""The ``gradguard`` command line: demo, report, watch, diagnose, export, runs.

Exit codes: 0 ok; 1 findings (``diagnose``) or a failed run; 2 usage or input errors
(bad arguments, a missing directory, no run store, a damaged file, a factory that
raises), as one line on stderr; 130 interrupted; 70 an internal error (a bug: please
report it; ``GRADGUARD_DEBUG=1`` prints the traceback of any error).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Sequence

from . import __version__

EXIT_OK, EXIT_FINDINGS, EXIT_USAGE = 0, 1, 2
EXIT_INTERNAL, EXIT_INTERRUPTED = 70, 130
_MAX_INTERVAL_S = 86400.0


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    if value > _MAX_INTERVAL_S:
        raise argparse.ArgumentTypeError(f"must be at most {_MAX_INTERVAL_S:g} s, got {text}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def _path(text: str) -> str:
    """A path the OS can take (``-``, stdout, where the command allows it)."""
    if not text or "\x00" in text:
        raise argparse.ArgumentTypeError(f"expected a file path, got {text!r}")
    return text


def _run_id(text: str) -> int | str:
    if text == "latest":
        return text
    try:
        return _positive_int(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"expected a run id (see `gradguard runs`) or 'latest', got {text!r}"
        ) from None


def _add_run_dir(parser: argparse.ArgumentParser, run: bool = True) -> None:
    parser.add_argument(
        "run_dir", type=_path, metavar="RUN_DIR", help="run directory or gradguard.db file"
    )
    if run:
        parser.add_argument(
            "--run",
            type=_run_id,
            default=None,
            metavar="ID",
            help="which run of the store (see `gradguard runs`; default the latest)",
        )


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
        type=_path,
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
        "run_dirs",
        nargs="+",
        type=_path,
        metavar="RUN_DIR",
        help="run directory or gradguard.db file",
    )
    report.add_argument(
        "--out",
        type=_path,
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
    _add_run_dir(watch)
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
    _add_run_dir(export)
    export.add_argument("--format", required=True, choices=("csv", "parquet", "jsonl"))
    export.add_argument(
        "--out",
        type=_path,
        metavar="FILE",
        help="output file, '-' for stdout (default RUN_DIR/steps.FORMAT)",
    )
    export.add_argument(
        "--tensors",
        action="store_true",
        help="export per-tensor snapshot norms in long format (step, name, norm)",
    )

    runs = commands.add_parser(
        "runs",
        help="list the runs recorded in a run directory",
        description="One line per run: id, status, steps, start time, process and host.",
    )
    _add_run_dir(runs, run=False)
    return parser


def _fail(message: str, code: int = EXIT_USAGE) -> int:
    line = " ".join(str(message).split())  # one line, whatever the message held
    print(f"gradguard: error: {line}", file=sys.stderr)
    return code


def _list_runs(run_dir: str) -> int:
    from .record.store import RunStore

    with RunStore.open(run_dir) as store:
        runs = store.runs()
    if not runs:
        print("no runs recorded yet")
    for r in runs:
        last = "" if r.last_step is None else f" (last step {r.last_step})"
        where = f"pid {r.pid} on {r.host}" if r.pid is not None else "v1 store"
        resumed = f", resumed {len(r.resumed)}x" if r.resumed else ""
        print(
            f"run {r.run}  {r.status:<11}  {r.steps} steps{last}  "
            f"started {r.started}  {where}{resumed}"
        )
    return EXIT_OK


def _diagnose(args: argparse.Namespace) -> int:
    from .diagnose import ProbeError, load_factory, probe, report

    try:
        result = probe(load_factory(args.factory), args.steps)
    except ProbeError as e:  # the user's factory, model, data or loss failed: one line
        if os.environ.get("GRADGUARD_DEBUG") and e.__cause__ is not None:
            raise e.__cause__ from None
        raise
    print(report(result))
    return result.exit_code


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

        return watch(args.run_dir, args.interval, args.once, run=args.run)
    if args.command == "diagnose":
        return _diagnose(args)
    if args.command == "export":
        from .export import export

        where = export(args.run_dir, args.format, args.out, args.tensors, run=args.run)
        if where != "-":
            print(f"wrote {where}")
        return EXIT_OK
    if args.command == "runs":
        return _list_runs(args.run_dir)
    if args.command == "demo":
        return _demo(args)
    raise AssertionError(args.command)


def _demo(args: argparse.Namespace) -> int:
    from .demo import main as demo_main

    return demo_main(args.steps, out=args.out)


def _input_errors() -> tuple[type[BaseException], ...]:
    from .diagnose import ProbeError
    from .export import ExportError
    from .record.store import StoreError

    return (StoreError, ProbeError, ExportError)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    if args.command == "demo" and args.steps < 500:
        parser.error("--steps must be at least 500: the bad batches come at steps 300-450")
    debug = bool(os.environ.get("GRADGUARD_DEBUG"))
    try:
        return _run(args)
    except _input_errors() as e:
        if debug:
            raise
        return _fail(str(e))
    except BrokenPipeError:  # e.g. `gradguard export ... --out - | head`
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - silence the flush at exit
        return EXIT_OK
    except OSError as e:
        if debug:
            raise
        where = f": {e.filename}" if e.filename else ""
        return _fail(f"{e.strerror or e}{where}")
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except Exception as e:
        if debug:
            raise
        return _fail(
            f"internal error ({type(e).__name__}: {e}); please report it, with the output of "
            "the same command run with GRADGUARD_DEBUG=1",
            EXIT_INTERNAL,
        )


if __name__ == "__main__":
    sys.exit(main())
