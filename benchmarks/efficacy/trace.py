"""Norm trajectory of one exploding RNN run under a few policies (how each one reacts).

``python -m benchmarks.efficacy.trace [--seed S] [--lr LR] [--rows a,b]``: addition task,
T=20, prints the total gradient norm, the policy's threshold, the loss and the weight
norm at a few steps, for no clipping, clip 0.3, the old default (ZClip) and
``default_policy()`` (FeedbackClip) by default, trained through the suite's loop (which
gives policies the loss and LR).
"""

from __future__ import annotations

import argparse
import warnings

import torch
from torch import nn

from . import loop, rnn, tables
from .policies import DEFAULT, NONE, OLD_DEFAULT, resolve
from .suite import SWEEP

STEPS = (1, 5, 10, 20, 25, 26, 30, 50, 100, 300, 600)


def trace(name: str, config: rnn.RNNConfig, seed: int) -> list[list[str]]:
    """One table row per checkpoint step: ``policy, step, |g|, threshold, loss, |w|``."""
    factory, rewind = resolve(name, SWEEP)
    torch.manual_seed(seed)
    model = rnn.TanhRNN(config.hidden, config.recurrent_gain)
    data = torch.Generator().manual_seed(1000 + seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum)
    weights: dict[int, float] = {}

    def forward(step: int):
        x, y = rnn.batch(config, config.batch, data)
        loss = nn.functional.mse_loss(model(x), y)
        return loss, loss.detach(), True

    def check(step: int) -> bool:
        if step in STEPS:
            flat = torch.cat([p.detach().flatten() for p in model.parameters()])
            weights[step] = flat.norm().item()
        return False

    setup = loop.Setup(model, optimizer)
    run = loop.run(setup, factory(), max(STEPS), forward, check=check, rewind=rewind)
    rows = []
    for step in STEPS:
        if step > len(run.losses):
            break
        i = step - 1
        rows.append(
            [
                name,
                str(step),
                f"{run.norms[i]:.3g}",
                f"{run.thresholds[i]:.3g}",
                f"{run.losses[i]:.3g}",
                f"{weights.get(step, float('nan')):.3g}",
            ]
        )
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--rows", default=f"{NONE},clip 0.3,{OLD_DEFAULT},{DEFAULT}")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", "gradguard:")
    config = rnn.RNNConfig(task="addition", length=20, lr=args.lr)
    rows = [row for name in args.rows.split(",") for row in trace(name, config, args.seed)]
    header = ["policy", "step", "grad norm", "threshold", "loss", "weight norm"]
    print(tables.markdown(header, rows))


if __name__ == "__main__":
    main()
