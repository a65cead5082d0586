"""Fault injection: a skipped step changes nothing, for every torch optimizer.

Each trial trains two identical tiny models under a ``Guard`` (default policy). The
*faulted* run gets NaN, inf or -inf written into a random element of a random gradient at
random steps (the first step included); its *twin* never sees those steps at all. After
every step both runs must hold the same parameters and the same optimizer state, bit for
bit (state created on a skipped first step counts as a mismatch), and every faulted step
must be reported skipped, naming the poisoned parameter.

Covered: fused, foreach and single-tensor Adam, AdamW, SGD (momentum, nesterov),
Adagrad; foreach and single-tensor RMSprop, Adamax, NAdam, RAdam, Adafactor; with and
without AMP (bf16 autocast and a GradScaler); an MLP, a CNN and a GRU; the host-math path
(CPU) and the device-math path (``host_math=False``, as on an accelerator: fused skips are
folded into ``found_inf``).

Run by hand: ``python benchmarks/faults.py [--injections 10000] [--seed 0]``. Prints the
counts per optimizer and the totals; exits 1 if any mismatch is found.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

import gradguard as gg

OptimizerFactory = Callable[[list[nn.Parameter]], torch.optim.Optimizer]


def _optimizers() -> dict[str, OptimizerFactory]:
    o = torch.optim
    roster: dict[str, OptimizerFactory] = {}
    for impl, kw in (("fused", {"fused": True}), ("foreach", {"foreach": True}), ("single", {})):
        if impl == "single":
            kw = {"foreach": False}
        roster[f"Adam/{impl}"] = lambda ps, kw=kw: o.Adam(ps, lr=1e-2, **kw)
        roster[f"AdamW/{impl}"] = lambda ps, kw=kw: o.AdamW(ps, lr=1e-2, weight_decay=0.1, **kw)
        roster[f"SGD-momentum/{impl}"] = lambda ps, kw=kw: o.SGD(ps, lr=1e-2, momentum=0.9, **kw)
        roster[f"SGD-nesterov/{impl}"] = lambda ps, kw=kw: o.SGD(
            ps, lr=1e-2, momentum=0.9, nesterov=True, **kw
        )
        roster[f"Adagrad/{impl}"] = lambda ps, kw=kw: o.Adagrad(ps, lr=1e-2, **kw)
        if impl == "fused":
            continue
        roster[f"RMSprop/{impl}"] = lambda ps, kw=kw: o.RMSprop(ps, lr=1e-3, momentum=0.5, **kw)
        roster[f"Adamax/{impl}"] = lambda ps, kw=kw: o.Adamax(ps, lr=1e-2, **kw)
        roster[f"NAdam/{impl}"] = lambda ps, kw=kw: o.NAdam(ps, lr=1e-2, **kw)
        roster[f"RAdam/{impl}"] = lambda ps, kw=kw: o.RAdam(ps, lr=1e-2, **kw)
        if hasattr(o, "Adafactor"):
            roster[f"Adafactor/{impl}"] = lambda ps, kw=kw: o.Adafactor(ps, lr=1e-2, **kw)
    return roster


#: Every optimizer configuration the guarantee covers.
OPTIMIZERS: dict[str, OptimizerFactory] = _optimizers()


class _GRU(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, 8)
        self.gru = nn.GRU(8, 8, batch_first=True)
        self.head = nn.Linear(8, 1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        out, _ = self.gru(self.embed(tokens))
        return self.head(out[:, -1])


def _model(shape: str) -> nn.Module:
    if shape == "mlp":
        return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 1))
    if shape == "cnn":
        return nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(48, 1))
    return _GRU()


def _batch(shape: str, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(10_000 + step)
    if shape == "mlp":
        x = torch.randn(8, 6, generator=g)
    elif shape == "cnn":
        x = torch.randn(8, 1, 6, 6, generator=g)
    else:
        x = torch.randint(0, 11, (8, 5), generator=g)
    return x, torch.randn(8, 1, generator=g)


SHAPES = ("mlp", "cnn", "gru")


@dataclass(frozen=True)
class Trial:
    """One faulted run and its twin."""

    optimizer: str
    shape: str
    amp: bool
    host_math: bool
    steps: int
    faults: dict[int, tuple[int, float]]  # step -> (parameter index, value)


@dataclass
class Outcome:
    injections: int = 0
    reported: int = 0  # faulted steps reported skipped
    named: int = 0  # ... naming the poisoned parameter
    param_mismatches: int = 0
    state_mismatches: int = 0


def _same(a: object, b: object) -> bool:
    """Bit-for-bit equality of nested optimizer state (NaN equals NaN)."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        if a.shape != b.shape or a.dtype != b.dtype:
            return False
        bits_a, bits_b = (t.reshape(-1).contiguous().view(torch.uint8) for t in (a, b))
        return torch.equal(bits_a, bits_b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


class _Run:
    def __init__(self, trial: Trial) -> None:
        torch.manual_seed(1234)
        self.model = _model(trial.shape)
        self.optimizer = OPTIMIZERS[trial.optimizer](list(self.model.parameters()))
        self.guard = gg.Guard(self.model, health=False, host_math=trial.host_math)
        self.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10) if trial.amp else None
        self.trial = trial

    def step(self, step: int, fault: tuple[int, float] | None) -> gg.StepResult:
        x, y = _batch(self.trial.shape, step)
        self.optimizer.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.trial.amp):
            loss = (self.model(x).float() - y).pow(2).mean()
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        if fault is not None:
            index, value = fault
            grad = list(self.model.parameters())[index].grad
            flat = grad.view(-1)
            flat[(step * 7919 + index) % flat.numel()] = value
        result = self.guard.step(self.optimizer, self.scaler, loss=loss)
        if self.scaler is not None:
            self.scaler.update()
        return result


def run_trial(trial: Trial) -> Outcome:
    """Train the faulted run and its twin side by side; count what differs."""
    faulted, twin = _Run(trial), _Run(trial)
    names = [n for n, _ in faulted.model.named_parameters()]
    out = Outcome()
    for step in range(trial.steps):
        fault = trial.faults.get(step)
        result = faulted.step(step, fault)
        if fault is None:
            twin.step(step, None)
        else:
            out.injections += 1
            out.reported += result.is_skipped()
            out.named += names[fault[0]] in result.nonfinite_names()
        params_a = [p.detach() for p in faulted.model.parameters()]
        params_b = [p.detach() for p in twin.model.parameters()]
        out.param_mismatches += not _same(params_a, params_b)
        state_a = faulted.optimizer.state_dict()["state"]
        state_b = twin.optimizer.state_dict()["state"]
        out.state_mismatches += not _same(state_a, state_b)
    return out


def random_trial(rng: random.Random, optimizer: str | None = None) -> Trial:
    """A trial with 1-3 faults among 5 steps, the first step faulted one time in three."""
    name = optimizer or rng.choice(sorted(OPTIMIZERS))
    shape = rng.choice(SHAPES)
    steps = 5
    chosen = set(rng.sample(range(1, steps), rng.randint(0, 2)))
    if rng.random() < 1 / 3 or not chosen:
        chosen.add(0)
    count = len(list(_model(shape).parameters()))
    values = (float("nan"), float("inf"), float("-inf"))
    faults = {s: (rng.randrange(count), rng.choice(values)) for s in sorted(chosen)}
    return Trial(name, shape, rng.random() < 0.5, rng.random() < 0.5, steps, faults)


def run(injections: int, seed: int = 0) -> dict[str, Outcome]:
    """Random trials until ``injections`` faults were injected; outcomes per optimizer."""
    rng = random.Random(seed)
    results: dict[str, Outcome] = {}
    done = 0
    names = sorted(OPTIMIZERS)
    for index in range(10**9):
        if done >= injections:
            break
        trial = random_trial(rng, names[index % len(names)])  # every optimizer in turn
        outcome = run_trial(trial)
        total = results.setdefault(trial.optimizer, Outcome())
        for field in ("injections", "reported", "named", "param_mismatches", "state_mismatches"):
            setattr(total, field, getattr(total, field) + getattr(outcome, field))
        done += outcome.injections
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--injections", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # every trial warns about its first skip
        results = run(args.injections, args.seed)
    header = f"{'optimizer':24s} {'injections':>10s} {'reported':>9s} {'named':>7s}"
    print(f"torch {torch.__version__}: {header} {'param diff':>10s} {'state diff':>10s}")
    totals: Counter[str] = Counter()
    for name in sorted(results):
        r = results[name]
        print(
            f"{'':13s}{name:24s} {r.injections:10d} {r.reported:9d} {r.named:7d} "
            f"{r.param_mismatches:10d} {r.state_mismatches:10d}"
        )
        for field in ("injections", "reported", "named", "param_mismatches", "state_mismatches"):
            totals[field] += getattr(r, field)
    print(
        f"{'':13s}{'total':24s} {totals['injections']:10d} {totals['reported']:9d} "
        f"{totals['named']:7d} {totals['param_mismatches']:10d} {totals['state_mismatches']:10d}"
    )
    print(f"{time.perf_counter() - start:.0f} s")
    failed = totals["param_mismatches"] or totals["state_mismatches"]
    failed = failed or totals["reported"] != totals["injections"]
    sys.exit(1 if failed or totals["named"] != totals["injections"] else 0)


if __name__ == "__main__":
    main()
