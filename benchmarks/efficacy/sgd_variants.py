"""SGD set-ups the suite does not train: plain SGD, momentum 0.99, Nesterov.

``python -m benchmarks.efficacy.sgd_variants [--seeds N] [--seed-base S] [--jobs J]
[--cases a,b] [--rows a,b]`` trains the suite's RNN, CNN and LSTM models under SGD
settings the suite leaves out (every suite and corpus SGD task uses momentum 0.9): the
same effective learning rate without momentum (addition at lr 0.5 and 1, multiplication
at lr 2, the CNN whose LR jumps ×20 at lr 0.5, the LSTM at lr 1 and 8), momentum 0.99
at a tenth of the LR (addition, the healthy CNN and its LR jump) and Nesterov momentum
(the healthy CNN and its LR jump). Seeds start at 5, after the suite's. Prints one
table per case: the median final metric (test MSE, held-out loss) and clip rate.
"""

from __future__ import annotations

import argparse
import statistics
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from . import cnn, lstm, rnn
from .parallel import starmap
from .policies import resolve
from .suite import SWEEP


class NesterovSGD(torch.optim.SGD):
    """``torch.optim.SGD`` with Nesterov momentum (0.9 unless told)."""

    def __init__(self, params: Any, lr: float, momentum: float = 0.9, **kwargs: Any) -> None:
        super().__init__(params, lr=lr, momentum=momentum, nesterov=True, **kwargs)


@dataclass(frozen=True)
class Case:
    train: Callable[..., Any]
    config: Any
    nesterov: bool = False


CASES = {
    "add-plain-0.5": Case(rnn.train, rnn.RNNConfig(length=20, lr=0.5, momentum=0.0)),
    "add-plain-1": Case(rnn.train, rnn.RNNConfig(length=20, lr=1.0, momentum=0.0)),
    "mul-plain-2": Case(
        rnn.train, rnn.RNNConfig(task="multiplication", length=20, lr=2.0, momentum=0.0)
    ),
    "add-m0.99": Case(rnn.train, rnn.RNNConfig(length=20, lr=0.01, momentum=0.99)),
    "cnn-plain-jump": Case(cnn.train, cnn.CNNConfig(lr=0.5, momentum=0.0, jump=20.0)),
    "cnn-m0.99": Case(cnn.train, cnn.CNNConfig(lr=0.005, momentum=0.99)),
    "cnn-m0.99-jump": Case(cnn.train, cnn.CNNConfig(lr=0.005, momentum=0.99, jump=20.0)),
    "cnn-nesterov": Case(cnn.train, cnn.CNNConfig(), nesterov=True),
    "cnn-nesterov-jump": Case(cnn.train, cnn.CNNConfig(jump=20.0), nesterov=True),
    "lstm-plain-1": Case(lstm.train, lstm.LSTMConfig(lr=1.0)),
    "lstm-plain-8": Case(lstm.train, lstm.LSTMConfig(lr=8.0)),
}
ROWS = ("none", "default", "fb:step_ratio=0", "clip 0.1", "clip 0.3", "clip 1", "clip 3")


def _job(case: str, row: str, seed: int) -> tuple[float, float]:
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", "gradguard:")
    spec = CASES[case]
    factory, rewind = resolve(row, SWEEP)
    saved = torch.optim.SGD
    if spec.nesterov:  # the task modules build torch.optim.SGD by name
        torch.optim.SGD = NesterovSGD  # type: ignore[misc]
    try:
        result = spec.train(spec.config, row, factory, seed, rewind)
    finally:
        torch.optim.SGD = saved  # type: ignore[misc]
    return result.final, result.clipped


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--seed-base", type=int, default=5)
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--rows", default=",".join(ROWS))
    args = parser.parse_args(argv)
    cases, rows = args.cases.split(","), args.rows.split(",")
    seeds = range(args.seed_base, args.seed_base + args.seeds)
    specs = [(c, r, s) for c in cases for r in rows for s in seeds]
    results = starmap(_job, specs, args.jobs)
    done = dict(zip(specs, results))
    for case in cases:
        print(f"\n{case} (seeds {seeds.start}–{seeds.stop - 1})\n")
        print("| row | final, per seed | median | clipped |")
        print("|---|---|---|---|")
        for row in rows:
            finals = [done[(case, row, s)][0] for s in seeds]
            clipped = [done[(case, row, s)][1] for s in seeds]
            shown = ", ".join(f"{v:.4g}" for v in finals)
            print(
                f"| {row} | {shown} | {statistics.median(finals):.4g} | "
                f"{100 * statistics.median(clipped):.0f} % |"
            )


if __name__ == "__main__":
    main()
