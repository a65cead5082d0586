"""``python -m benchmarks.diagnosis``: train the labelled corpus through gradguard and score
what its health rules found.

Each run trains as a user would (``gg.Guard`` with a run store), then the scorer reads
the findings back from the store. The runs go to a temporary directory (``--out`` keeps
them). ``--split`` picks the tuning two thirds, the held-out third or all runs.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from .corpus import CORPUS, SPLIT_SEED, split
from .scorer import ScoreError, details, dump, read_findings, score_run, summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.diagnosis", description=__doc__)
    parser.add_argument("--split", choices=("tuning", "held-out", "all"), default="all")
    parser.add_argument("--runs", nargs="+", metavar="NAME", help="only these runs")
    parser.add_argument(
        "--out", metavar="DIR", help="keep the run stores here (a new or empty directory)"
    )
    parser.add_argument("--json", metavar="FILE", help="write every run's score as JSON")
    parser.add_argument("--list", action="store_true", help="list the runs and their labels")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument(
        "--rescore",
        metavar="DIR",
        help="score the findings recorded in the runs kept in DIR (by --out), without training",
    )
    parser.add_argument(
        "--replay",
        metavar="DIR",
        help="score the runs kept in DIR (by --out) with today's rules replayed offline, "
        "without training (for working on the rules; the figures come from live runs)",
    )
    args = parser.parse_args(argv)

    tuning, held = split()
    held_names = {s.name for s in held}
    chosen = {"tuning": tuning, "held-out": held, "all": CORPUS}[args.split]
    if args.runs:
        known = {s.name: s for s in CORPUS}
        unknown = [n for n in args.runs if n not in known]
        if unknown:
            parser.error(f"unknown run(s) {unknown}; --list shows the corpus")
        chosen = [known[n] for n in args.runs]
    if args.list:
        for spec in chosen:
            where = "held-out" if spec.name in held_names else "tuning"
            print(f"{spec.name:32s} {where:8s} {spec.task:15s} {spec.labels() or 'healthy'}")
        return 0
    if args.replay or args.rescore:
        return _replay(Path(args.replay or args.rescore), chosen, held_names, bool(args.replay))
    if args.out:
        out = Path(args.out)
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            parser.error(f"--out {args.out!r} must be a new or empty directory")
        out.mkdir(parents=True, exist_ok=True)
    else:
        out = Path(tempfile.mkdtemp(prefix="gg-diagnosis-"))

    import torch

    from .runner import train

    torch.set_num_threads(max(1, args.threads))
    scores = []
    started = time.perf_counter()
    try:
        for i, spec in enumerate(chosen, 1):
            result = train(spec, out / spec.name)
            where = "held-out" if spec.name in held_names else "tuning"
            score = score_run(
                spec, where, read_findings(result.store), result.seconds, result.warnings
            )
            scores.append(score)
            flag = (
                ""
                if not (score.false_claims or any(not lab.detected for lab in score.labels))
                else "  ✗"
            )
            print(f"[{i}/{len(chosen)}] {spec.name} {result.seconds:.1f} s{flag}", flush=True)
    except ScoreError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if not args.out:
            shutil.rmtree(out, ignore_errors=True)
    elapsed = time.perf_counter() - started
    print()
    print(
        f"split seed {SPLIT_SEED}; torch threads {args.threads}; {elapsed:.0f} s in all; "
        f"cpu count {os.cpu_count()}"
    )
    for name, group in (
        ("tuning", [s for s in scores if s.split == "tuning"]),
        ("held-out", [s for s in scores if s.split == "held-out"]),
    ):
        if group:
            print()
            print(summary(group, name))
    print()
    print(details(scores))
    if args.json:
        dump(scores, Path(args.json))
    return 0


def _replay(root: Path, chosen: list, held_names: set[str], replay: bool) -> int:
    from .scorer import replay_findings

    findings = replay_findings if replay else read_findings

    if not root.is_dir():
        print(f"error: {str(root)!r} is not a directory", file=sys.stderr)
        return 2
    scores = []
    try:
        for spec in chosen:
            if (root / spec.name).is_dir():
                where = "held-out" if spec.name in held_names else "tuning"
                scores.append(score_run(spec, where, findings(root / spec.name)))
    except ScoreError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not scores:
        print(f"error: no corpus run stores under {str(root)!r}", file=sys.stderr)
        return 2
    for name in ("tuning", "held-out"):
        group = [s for s in scores if s.split == name]
        if group:
            print(summary(group, f"{name} ({'replayed' if replay else 'rescored'})"))
            print()
    print(details(scores))
    return 0


if __name__ == "__main__":
    sys.exit(main())
