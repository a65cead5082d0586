"""Norm trajectory of one exploding RNN run under a few policies (why the default fails).

``python -m benchmarks.efficacy.trace [--seed S] [--lr LR]``: addition task, T=20,
prints the total gradient norm, the policy's threshold, the loss and the weight norm
at a few steps, for no clipping, clip 0.3, ``default_policy()`` and AutoClip.
"""

from __future__ import annotations

import argparse
import math
import warnings

import torch
from torch import nn

import gradguard as gg

from . import rnn, tables
from .policies import DEFAULT, NONE, NoClip, PolicyFactory

STEPS = (1, 5, 10, 20, 25, 26, 30, 50, 100, 300, 600)


def trace(name: str, factory: PolicyFactory, config: rnn.RNNConfig, seed: int) -> list[str]:
    """One table row per checkpoint step: ``step, |g|, threshold, loss, |w|``."""
    torch.manual_seed(seed)
    model = rnn.TanhRNN(config.hidden, config.recurrent_gain)
    data = torch.Generator().manual_seed(1000 + seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum)
    guard = gg.Guard(model, factory())
    rows = []
    for step in range(1, max(STEPS) + 1):
        x, y = rnn.batch(config, config.batch, data)
        loss = nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        result = guard.step(optimizer)
        assert result is not None
        if step in STEPS or not math.isfinite(loss.item()):
            weights = torch.cat([p.detach().flatten() for p in model.parameters()]).norm()
            rows.append(
                [
                    name,
                    str(step),
                    f"{result.total_norm.item():.3g}",
                    f"{result.threshold.item():.3g}",
                    f"{loss.item():.3g}",
                    f"{weights.item():.3g}",
                ]
            )
        if not math.isfinite(loss.item()):
            break
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=0.1)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", "gradguard: step", RuntimeWarning)
    config = rnn.RNNConfig(task="addition", length=20, lr=args.lr)
    policies = {
        NONE: NoClip,
        "clip 0.3": lambda: gg.ClipNorm(0.3),
        DEFAULT: gg.default_policy,
        "AutoClip": gg.AutoClip,
    }
    rows = [row for name, f in policies.items() for row in trace(name, f, config, args.seed)]
    header = ["policy", "step", "grad norm", "threshold", "loss", "weight norm"]
    print(tables.markdown(header, rows))


if __name__ == "__main__":
    main()
