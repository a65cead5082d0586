"""The ``gradguard`` command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from . import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gradguard", description="Measure, diagnose and guard neural-network gradients."
    )
    parser.add_argument("--version", action="version", version=f"gradguard {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = commands.add_parser(
        "demo", help="train a run with bad batches, unguarded then guarded, and compare"
    )
    demo.add_argument("--steps", type=int, default=600, help="training steps per run")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "demo":
        if args.steps < 500:
            parser.error("--steps must be at least 500: the bad batches come at steps 300-450")
        from .demo import main as demo_main

        return demo_main(args.steps)
    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
