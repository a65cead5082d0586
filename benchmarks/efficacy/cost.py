"""What the self-tuning default and rewind cost per step, on the suite's models.

``python -m benchmarks.efficacy.cost [--rounds R] [--steps N]``: for each model of the
suite, times a full training step (forward, backward, ``guard.step``) under today's
default policy and the self-tuning one, and the same step with a ``Rewind`` that
snapshots every step (the cost of one snapshot and check) or every 100 steps
(amortised). Medians of interleaved rounds, one thread. Memory is one snapshot's bytes.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

import gradguard as gg

from . import bytelm, cnn, lm, lstm, rnn, text
from .policies import candidates


@dataclass
class Bench:
    """One model, its optimizer, and a step closure that computes the loss."""

    name: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    loss: Callable[[], torch.Tensor]


def benches() -> list[Bench]:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    out = []
    config = rnn.RNNConfig(task="addition", length=20)
    model = rnn.TanhRNN(config.hidden, config.recurrent_gain)
    x, y = rnn.batch(config, config.batch, gen)
    out.append(
        Bench(
            "RNN (addition)",
            model,
            torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
            lambda m=model, x=x, y=y: nn.functional.mse_loss(m(x), y),
        )
    )
    lm_config = lm.LMConfig()
    model = lm.TinyLM(lm_config)
    tokens = torch.randint(0, lm_config.vocab, (lm_config.batch, lm_config.context), generator=gen)
    out.append(
        Bench(
            "transformer LM",
            model,
            torch.optim.AdamW(model.parameters(), lr=3e-3),
            lambda m=model, t=tokens: _lm_loss(m, t),
        )
    )
    model = cnn.SmallCNN()
    images, labels = cnn.split(0)[:2]
    out.append(
        Bench(
            "CNN (digits)",
            model,
            torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
            lambda m=model: nn.functional.cross_entropy(m(images[:64]), labels[:64]),
        )
    )
    byte_config = bytelm.ByteLMConfig()
    model = lm.TinyLM(byte_config)
    window = text.windows(text.corpus()[0], byte_config.batch, byte_config.context, gen)
    out.append(
        Bench(
            "byte transformer LM",
            model,
            torch.optim.AdamW(model.parameters(), lr=3e-3),
            lambda m=model, t=window: _lm_loss(m, t),
        )
    )
    lstm_config = lstm.LSTMConfig()
    model = lstm.ByteLSTM(lstm_config)
    window = text.windows(text.corpus()[0], lstm_config.batch, lstm_config.context, gen)
    out.append(
        Bench(
            "byte LSTM",
            model,
            torch.optim.SGD(model.parameters(), lr=1.0),
            lambda m=model, t=window: _lm_loss(m, t),
        )
    )
    return out


def _lm_loss(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    logits = model(tokens[:, :-1])
    return nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())


def _time(bench: Bench, policy: gg.Policy, rewind: dict | None, steps: int) -> float:
    """Seconds per step of ``steps`` training steps (after two warm-up steps)."""
    guard = gg.Guard(bench.model, policy)
    rewinder = gg.Rewind(bench.model, bench.optimizer, guard=guard, **rewind) if rewind else None
    feed = [p for p in _walk(policy) if hasattr(p, "observe")]

    def one() -> None:
        loss = bench.loss()
        bench.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for p in feed:
            p.observe(loss.detach(), bench.optimizer.param_groups[0]["lr"])
        guard.step(bench.optimizer, loss=loss.detach())
        if rewinder is not None:
            rewinder.step(loss.detach())

    for _ in range(2):
        one()
    start = time.perf_counter()
    for _ in range(steps):
        one()
    return (time.perf_counter() - start) / steps


def _walk(policy: gg.Policy):
    yield policy
    for inner in getattr(policy, "policies", ()):
        yield from _walk(inner)


def measure(rounds: int, steps: int, new: str) -> list[list[str]]:
    """Rows: model, step time under each configuration, ratios, snapshot memory."""
    factory = candidates()[new]
    configs = {
        "default": (gg.default_policy, None),
        new: (factory, None),
        f"{new} + rewind every step": (factory, {"every": 1, "check_every": 1}),
        f"{new} + rewind every 100": (factory, {"every": 100}),
    }
    rows = []
    for bench in benches():
        times: dict[str, list[float]] = {k: [] for k in configs}
        for _ in range(rounds):
            for name, (make, rewind) in configs.items():
                times[name].append(_time(bench, make(), rewind, steps))
        med = {k: statistics.median(v) for k, v in times.items()}
        base = med[new]
        snapshot = med[f"{new} + rewind every step"] - base
        amortised = med[f"{new} + rewind every 100"] - base
        memory = gg.Rewind(bench.model, bench.optimizer).snapshot_bytes
        rows.append(
            [
                bench.name,
                f"{med['default'] * 1e3:.2f} ms",
                f"{base * 1e3:.2f} ms ({base / med['default']:.2f}x)",
                f"{snapshot * 1e3:.2f} ms",
                f"{amortised / base:+.1%}",
                f"{memory / 1e6:.2f} MB",
            ]
        )
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--policy", default="fb", help="the self-tuning row to time")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", "gradguard:")
    from .tables import markdown

    header = [
        "model",
        "step, default policy",
        f"step, {args.policy}",
        "one snapshot + check",
        "rewind every 100 steps, per step",
        "snapshot memory",
    ]
    print(markdown(header, measure(args.rounds, args.steps, args.policy)))


if __name__ == "__main__":
    main()
