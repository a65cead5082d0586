"""Policies on runs they were not tuned on: the diagnosis corpus, trained again.

``python -m benchmarks.efficacy.heldout [--part healthy|faulty|both] [--seeds N] [--jobs J]``
takes
the runs of the diagnosis corpus (``benchmarks/diagnosis/corpus.py``: MLPs on
scikit-learn tables, CNNs on digits, LSTM, GRU and tanh-RNN, GPT-style and embedding
LMs; AdamW, SGD, RMSprop; schedules, accumulation, bf16, fp16), written to test the
health rules, never to choose a policy's settings, and trains each one again, same
seed and data, under several policies:

* **healthy** runs: unclipped (``monitor``), the default, and ZClip as the default was
  until now (``zclip``): share of steps clipped, final training loss against unclipped;
* **faulty** runs a clip can matter for (LR too high, LR jump, corrupt batch, exploding
  RNN, label noise): the same rows and fixed thresholds 0.1–10: is the untuned default
  as good as the best threshold swept, and never worse than no clipping?

The final loss is the mean training loss of the last tenth of the steps (NaN if any is
non-finite); "matches" means within :data:`TOLERANCE` (relative), as the runs are
paired.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import warnings
from dataclasses import replace
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    __package__ = "benchmarks.efficacy"

import numpy as np
import torch

from benchmarks.diagnosis.corpus import FAULTY, HEALTHY
from benchmarks.diagnosis.runner import RunSpec, train
from gradguard.record.store import RunStore

from .parallel import starmap
from .suite import SWEEP

#: Paired final losses closer than this (relative) match.
TOLERANCE = 0.05
#: Fault classes a clipping policy can change the outcome of.
CLIPPABLE = ("lr_high", "lr_jump", "corrupt", "exploding_rnn", "label_noise")
#: The rows compared on every run (``default`` is ``gradguard.default_policy()``).
ADAPTIVE = ("default", "zclip")
#: A row named ``"<policy> + rewind"`` trains with ``gradguard.Rewind`` at its defaults.
REWIND = " + rewind"
UNCLIPPED = "monitor"


def faulty_runs() -> list[RunSpec]:
    return [s for s in FAULTY if s.name.startswith(CLIPPABLE)]


def _one(spec: RunSpec, policy: str) -> dict:
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    rewind = policy.endswith(REWIND)
    with tempfile.TemporaryDirectory() as folder:
        run = replace(spec, policy=policy.removesuffix(REWIND), rewind=rewind)
        result = train(run, Path(folder) / "run")
        with RunStore.open(result.store) as store:
            steps = store.steps()
            rewinds = len(store.events("rewind"))
    loss = steps["loss"]
    tail = loss[-max(1, len(loss) // 10) :]
    return {
        "steps": len(loss),
        "clipped": float(np.mean(steps["clipped"] & ~steps["skipped"])) if len(loss) else 0.0,
        "skipped": int(np.sum(steps["skipped"])),
        "final": float(np.mean(tail)) if len(tail) and np.all(np.isfinite(tail)) else math.nan,
        "seconds": result.seconds,
        "rewinds": rewinds,
    }


def reseeded(specs: list[RunSpec], seeds: int) -> list[RunSpec]:
    """Each run with its own seed, then ``seeds - 1`` more (seed + 1000·k, named ``@k``)."""
    out = list(specs)
    for k in range(1, seeds):
        out += [replace(s, name=f"{s.name}@{k}", seed=s.seed + 1000 * k) for s in specs]
    return out


def measure(specs: list[RunSpec], rows: list[str], jobs: int = 1) -> dict[str, dict[str, dict]]:
    """``{run name: {row: figures}}``."""
    pairs = [(spec, row) for spec in specs for row in rows]
    results = starmap(_one, pairs, jobs)
    out: dict[str, dict[str, dict]] = {}
    for (spec, row), figures in zip(pairs, results):
        out.setdefault(spec.name, {})[row] = figures
    return out


def compare(a: float, b: float) -> int:
    """-1 if final loss ``a`` is better than ``b``, 0 if it matches, 1 if worse."""
    if not math.isfinite(a):
        return 0 if not math.isfinite(b) else 1
    if not math.isfinite(b):
        return -1
    gap = (a - b) / max(abs(b), 1e-12)
    return 0 if abs(gap) <= TOLERANCE else (-1 if gap < 0 else 1)


_WORDS = {-1: "better", 0: "matches", 1: "worse"}


def _cell(figures: dict, reference: dict) -> str:
    word = _WORDS[compare(figures["final"], reference["final"])]
    skipped = f", {figures['skipped']} skipped" if figures["skipped"] else ""
    rewinds = f", {figures['rewinds']} rewinds" if figures.get("rewinds") else ""
    return f"{figures['final']:.4g} ({word}; {figures['clipped']:.0%} clipped{skipped}{rewinds})"


def render_healthy(results: dict[str, dict[str, dict]], rows: tuple[str, ...] = ADAPTIVE) -> str:
    lines = [
        "| healthy run | steps | unclipped | " + " | ".join(rows) + " |",
        "|---|---|---|" + "---|" * len(rows),
    ]
    for name, row in results.items():
        ref = row[UNCLIPPED]
        cells = [name, str(ref["steps"]), f"{ref['final']:.4g}"]
        cells += [_cell(row[p], ref) for p in rows]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for p in rows:
        rates = [row[p]["clipped"] for row in results.values()]
        kept = sum(
            compare(row[p]["final"], row[UNCLIPPED]["final"]) <= 0 for row in results.values()
        )
        over = sum(r > 0.05 for r in rates)
        lines.append(
            f"- `{p}`: clip rate median {np.median(rates):.1%}, worst {max(rates):.1%}, above 5 % "
            f"on {over}; final loss matches or beats unclipped on {kept} of {len(results)}."
        )
    return "\n".join(lines) + "\n"


def render_faulty(results: dict[str, dict[str, dict]], rows: tuple[str, ...] = ADAPTIVE) -> str:
    fixed = [f"clip:{t:g}" for t in SWEEP]
    lines = [
        "| faulty run | unclipped | best fixed (swept) | " + " | ".join(rows) + " |",
        "|---|---|---|" + "---|" * len(rows),
    ]
    tally = {p: {"best": 0, "unclipped": 0} for p in rows}
    for name, row in results.items():
        ref = row[UNCLIPPED]
        finite = [f for f in fixed if math.isfinite(row[f]["final"])]
        best = min(finite, key=lambda f: row[f]["final"]) if finite else fixed[0]
        cells = [name, f"{ref['final']:.4g}", f"{best}: {row[best]['final']:.4g}"]
        for p in rows:
            vs_best = compare(row[p]["final"], row[best]["final"])
            vs_none = compare(row[p]["final"], ref["final"])
            tally[p]["best"] += vs_best <= 0
            tally[p]["unclipped"] += vs_none <= 0
            rewinds = f", {row[p]['rewinds']} rewinds" if row[p].get("rewinds") else ""
            cells.append(
                f"{row[p]['final']:.4g} (vs best: {_WORDS[vs_best]}; vs unclipped: "
                f"{_WORDS[vs_none]}; {row[p]['clipped']:.0%} clipped{rewinds})"
            )
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    n = len(results)
    for p in rows:
        lines.append(
            f"- `{p}`: matches or beats the best swept threshold on {tally[p]['best']} of {n}, "
            f"unclipped on {tally[p]['unclipped']} of {n}."
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("healthy", "faulty", "both"), default="both")
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--seeds", type=int, default=1, help="seeds per run (its own first)")
    parser.add_argument(
        "--rows",
        default=",".join(ADAPTIVE),
        help=f"policies compared (default, zclip, feedback, monitor, clip:T; '<row>{REWIND}' "
        "adds gradguard.Rewind)",
    )
    parser.add_argument(
        "--optimizer", default=None, help="only the runs that train with this optimizer (sgd, ...)"
    )
    args = parser.parse_args(argv)
    compared = tuple(args.rows.split(","))

    def chosen(specs: list[RunSpec]) -> list[RunSpec]:
        return [s for s in specs if args.optimizer in (None, s.optimizer)]

    parts = []
    seconds = 0.0
    if args.part in ("healthy", "both"):
        healthy = measure(reseeded(chosen(HEALTHY), args.seeds), [UNCLIPPED, *compared], args.jobs)
        parts.append(render_healthy(healthy, compared))
        seconds += sum(f["seconds"] for row in healthy.values() for f in row.values())
    if args.part in ("faulty", "both"):
        rows = [UNCLIPPED, *compared, *(f"clip:{t:g}" for t in SWEEP)]
        faulty = measure(reseeded(chosen(faulty_runs()), args.seeds), rows, args.jobs)
        parts.append(render_faulty(faulty, compared))
        seconds += sum(f["seconds"] for row in faulty.values() for f in row.values())
    parts.append(f"_{seconds:.0f} s of training in all._\n")
    print("\n".join(parts))


if __name__ == "__main__":
    main()
