"""The efficacy tasks: hard ones (a policy can save or lose the run) and healthy ones.

Every task names its model family, its metric (``solve``: seeds solved, then test error;
``loss``: final held-out loss, lower is better) and, for loss tasks, the healthy task
whose unclipped runs are the reference for *steps lost*.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from . import bytelm, cnn, lm, lstm, rnn
from .policies import DEFAULT, NONE, OLD_DEFAULT, REWIND

#: Fixed global-norm thresholds swept on every hard task.
SWEEP = (0.1, 0.3, 1.0, 3.0, 10.0)


@dataclass(frozen=True)
class Task:
    """One efficacy task."""

    key: str  # short name for the command line
    family: str  # model family: RNN, transformer, CNN, LSTM
    config: Any
    train: Callable[..., Any]  # train(config, row name, policy factory, seed, rewind)
    kind: str = "loss"  # "solve" or "loss"
    healthy: bool = False
    reference: str | None = None  # key of the task whose unclipped runs are the reference
    rows: tuple[str, ...] | None = None  # the only rows run here (None: the full roster)

    @property
    def label(self) -> str:
        return self.config.label


def tasks(quick: bool = False, steps: int | None = None) -> list[Task]:
    """Every task at full size, or tiny (``quick``); ``steps`` overrides the step counts."""
    amp_rows = (NONE, "clip 0.1", "clip 1", DEFAULT, OLD_DEFAULT, DEFAULT + REWIND)
    out = [
        Task(
            "add-0.05",
            "RNN",
            rnn.RNNConfig(task="addition", length=20, lr=0.05),
            rnn.train,
            kind="solve",
        ),
        Task(
            "add-0.1",
            "RNN",
            rnn.RNNConfig(task="addition", length=20, lr=0.1),
            rnn.train,
            kind="solve",
        ),
        Task(
            "mul-0.2",
            "RNN",
            rnn.RNNConfig(task="multiplication", length=20, lr=0.2),
            rnn.train,
            kind="solve",
        ),
        Task(
            "lm-bad", "transformer", lm.LMConfig(name="LM, bad batches"), lm.train, reference="lm"
        ),
        Task(
            "lm-hot",
            "transformer",
            lm.LMConfig(name="LM, AdamW lr 0.03", lr=3e-2, bad_batches=()),
            lm.train,
            reference="lm",
        ),
        Task("cnn-jump", "CNN", cnn.CNNConfig(jump=20.0), cnn.train, reference="cnn"),
        Task(
            "bytelm-hot",
            "transformer",
            bytelm.ByteLMConfig(lr=3e-2),
            bytelm.train,
            reference="bytelm",
        ),
        Task(
            "bytelm-hot-warm",
            "transformer",
            bytelm.ByteLMConfig(lr=3e-2, warmup=100),
            bytelm.train,
            reference="bytelm",
        ),
        Task(
            "lstm-hot", "LSTM", lstm.LSTMConfig(lr=4.0, momentum=0.9), lstm.train, reference="lstm"
        ),
        Task(
            "cnn-jump-fp16",
            "CNN",
            cnn.CNNConfig(jump=20.0, autocast="fp16"),
            cnn.train,
            reference="cnn",
            rows=amp_rows,
        ),
        # healthy runs: the guard should stay out of the way
        Task(
            "rnn",
            "RNN",
            rnn.RNNConfig(task="addition", length=20, lr=0.01, recurrent_gain=1.0),
            rnn.train,
            kind="solve",
            healthy=True,
        ),
        Task(
            "lm",
            "transformer",
            lm.LMConfig(name="LM, AdamW lr 0.003", bad_batches=()),
            lm.train,
            healthy=True,
        ),
        Task("cnn", "CNN", cnn.CNNConfig(), cnn.train, healthy=True),
        Task(
            "bytelm",
            "transformer",
            bytelm.ByteLMConfig(lr=3e-3, warmup=40),
            bytelm.train,
            healthy=True,
        ),
        Task("lstm", "LSTM", lstm.LSTMConfig(lr=1.0, momentum=0.9), lstm.train, healthy=True),
    ]
    if quick:
        out = [replace(t, config=_quick(t.config)) for t in out]
    if steps is not None:
        out = [replace(t, config=_with_steps(t.config, steps)) for t in out]
    return out


def _quick(config: Any) -> Any:
    if isinstance(config, rnn.RNNConfig):
        return replace(config, steps=200, eval_every=20)
    if isinstance(config, lm.LMConfig):
        bad = (20, 21, 40) if config.bad_batches else ()
        return replace(config, steps=60, bad_batches=bad)
    if isinstance(config, cnn.CNNConfig):
        return replace(config, steps=80, jump_at=40)
    if isinstance(config, bytelm.ByteLMConfig):
        return replace(config, steps=40, warmup=min(config.warmup, 10), context=32)
    return replace(config, steps=40, context=32)


def _with_steps(config: Any, steps: int) -> Any:
    changes: dict[str, Any] = {"steps": steps}
    if isinstance(config, rnn.RNNConfig):
        changes["eval_every"] = min(config.eval_every, steps)
    if isinstance(config, cnn.CNNConfig):
        changes["jump_at"] = min(config.jump_at, steps // 2)
    return replace(config, **changes)


def by_key(all_tasks: list[Task]) -> dict[str, Task]:
    return {t.key: t for t in all_tasks}
