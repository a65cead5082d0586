"""What the self-tuning default and rewind cost per step, on the suite's models.

``python -m benchmarks.efficacy.cost [--rounds R] [--calls N]``: for each model of the
suite, the cost of ``guard.step(optimizer, loss=...)`` beyond a bare
``optimizer.step()`` under the old default policy (``chain(SkipNonFinite(),
ZClip(warmup_max_norm=10))``) and today's (``chain(SkipNonFinite(), FeedbackClip())``)
(same gradients; host math, the CPU default, and device math,
``host_math=False``, the accelerator's path), each as a ratio to the cost of
``torch.nn.utils.clip_grad_norm_(params, 1.0)`` measured in the same rounds; a full
training step; the time of one ``Rewind.step`` that snapshots and checks; and
``Rewind(every=100)``'s cost per step as a fraction of the training step. Medians of
interleaved rounds, one thread. Memory is one snapshot's bytes. Under SGD the default's
unstable-step rule also measures the weights' norm (every 10 steps): what it adds to
the default without it (``FeedbackClip(step_ratio=0)``) is shown for SGD models.
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
from .policies import old_default
from .tables import markdown


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
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10))
    x, labels = torch.randn(64, 32, generator=gen), torch.randint(0, 10, (64,), generator=gen)
    out.append(
        Bench(
            "MLP (4 tensors)",
            model,
            torch.optim.AdamW(model.parameters(), lr=1e-3),
            lambda m=model, x=x, y=labels: nn.functional.cross_entropy(m(x), y),
        )
    )
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
    width = 2048  # six 2048×2048 layers: 25M parameters, 300 MB of AdamW state and weights
    model = nn.Sequential(*[m for _ in range(6) for m in (nn.Linear(width, width), nn.ReLU())])
    x = torch.randn(32, width, generator=gen)
    out.append(
        Bench(
            "MLP, 25M parameters",
            model,
            torch.optim.AdamW(model.parameters(), lr=1e-4),
            lambda m=model, x=x: m(x).pow(2).mean(),
        )
    )
    model = nn.Sequential(*[m for _ in range(6) for m in (nn.Linear(width, width), nn.ReLU())])
    out.append(  # SGD: the default measures the weights' norm each step
        Bench(
            "MLP, 25M parameters, SGD",
            model,
            torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9),
            lambda m=model, x=x: m(x).pow(2).mean(),
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


def _per_call(fn: Callable[[], object], calls: int, budget: float = 0.25) -> float:
    """Seconds per call of ``fn`` (after two warm-up calls): ``calls`` calls, or fewer (at
    least 3) when they would take longer than ``budget`` seconds."""
    fn()
    start = time.perf_counter()
    fn()
    one = time.perf_counter() - start
    n = max(3, min(calls, int(budget / max(one, 1e-9))))
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n


def _fresh(params: list[torch.Tensor]) -> None:
    """Stand in for ``backward()``: new gradient tensors (same values), so the guard sees
    a new step (it refuses the gradients of the last one); the same cost in every case."""
    for p in params:
        p.grad = p.grad.detach()


def measure_one(bench: Bench, rounds: int, calls: int) -> list[str]:
    """One model: the guard's cost per step beyond a bare step under the old default
    (ZClip) and today's (FeedbackClip), host and device math, against
    ``clip_grad_norm_``'s in the same rounds; a full training step; rewind's snapshot
    cost and memory."""
    loss = bench.loss()
    bench.optimizer.zero_grad()
    loss.backward()
    value = loss.detach()
    params = [p for p in bench.model.parameters() if p.grad is not None]
    opt = bench.optimizer

    feedback = gg.default_policy
    guards = {
        "today": gg.Guard(bench.model, old_default()),
        "new": gg.Guard(bench.model, feedback()),
        "today, device": gg.Guard(bench.model, old_default(), host_math=False),
        "new, device": gg.Guard(bench.model, feedback(), host_math=False),
        # without the unstable-step rule, which measures the weights' norm under SGD
        "new, no step rule": gg.Guard(
            bench.model, gg.chain(gg.SkipNonFinite(), gg.FeedbackClip(step_ratio=0.0))
        ),
    }
    trained = gg.Guard(bench.model, feedback())

    def train_step() -> None:
        step_loss = bench.loss()
        opt.zero_grad()
        step_loss.backward()
        trained.step(opt, loss=step_loss.detach())

    every_step = gg.Rewind(bench.model, opt, guard=trained, every=1, check_every=1)
    every_100 = gg.Rewind(bench.model, opt, guard=trained, every=100)
    cases: dict[str, Callable[[], object]] = {
        "bare": lambda: (_fresh(params), opt.step()),
        "torch": lambda: (
            _fresh(params),
            torch.nn.utils.clip_grad_norm_(params, 1.0),
            opt.step(),
        ),
    }
    for name, guard in guards.items():
        cases[name] = lambda guard=guard: (_fresh(params), guard.step(opt, loss=value))
    cases["train"] = train_step
    cases["snapshot"] = lambda: every_step.step(value)
    cases["rewind100"] = lambda: every_100.step(value)
    timings: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(rounds):
        for name, fn in cases.items():
            n = calls if name != "rewind100" else max(calls, 100)  # take its snapshots too
            budget = 0.25 if name != "rewind100" else 5.0
            timings[name].append(_per_call(fn, n, budget))
    med = {k: statistics.median(v) for k, v in timings.items()}
    torch_cost = med["torch"] - med["bare"]
    cost = {name: med[name] - med["bare"] for name in guards}

    def versus(name: str) -> str:
        return f"{cost[name] * 1e6:.0f} µs ({cost[name] / torch_cost:.2f}x)"

    return [
        bench.name,
        f"{torch_cost * 1e6:.0f} µs",
        versus("today"),
        versus("new"),
        f"{cost['new'] / cost['today']:.2f}x",
        f"{(cost['new'] - cost['new, no step rule']) * 1e6:+.0f} µs"
        if isinstance(opt, torch.optim.SGD)
        else "—",
        versus("today, device"),
        versus("new, device"),
        f"{med['train'] * 1e3:.2f} ms",
        f"{med['snapshot'] * 1e3:.2f} ms",
        f"{med['rewind100'] / med['train']:.2%}",
        f"{every_100.snapshot_bytes / 1e6:.2f} MB",
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=200)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", "gradguard:")
    header = [
        "model",
        "clip_grad_norm_ cost",
        "guard cost, old default: ZClip (x torch)",
        "guard cost, default: FeedbackClip (x torch)",
        "FeedbackClip / ZClip",
        "of which the SGD step rule",
        "ZClip, device math",
        "FeedbackClip, device math",
        "training step",
        "one snapshot + check",
        "Rewind(every=100), per step",
        "snapshot memory",
    ]
    print(markdown(header, [measure_one(b, args.rounds, args.calls) for b in benches()]))


if __name__ == "__main__":
    main()
