"""Weights & Biases sink (extra ``gradguard[wandb]``); works with ``mode="offline"``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ...schema import Event, HostBatch
from ._episodes import CLOSED, OPENED, EpisodeLog, describe, step_of
from ._naming import missing, sanitize_wandb, step_metrics


class WandbSink:
    """Logs one ``run.log(metrics, step=step)`` per recorded step.

    Args:
        run: an existing W&B run (not finished by us); ``None`` starts one with
            ``wandb.init(**init_kwargs)`` (e.g. ``project=..., mode="offline"``).
    """

    def __init__(self, run: Any = None, **init_kwargs: Any) -> None:
        try:
            import wandb
        except ImportError as e:
            raise missing("wandb", "wandb") from e
        self._wandb = wandb
        self._init_kwargs = init_kwargs
        self.run = run
        self._owns = run is None
        self._keys: dict[str, str] = {}
        self._counts: dict[str, int] = {}
        self._episodes = EpisodeLog()
        self._counted: set[str | None] = set()  # keys of episodes counted when they opened

    def _key(self, name: str) -> str:
        key = self._keys.get(name)
        if key is None:
            key = self._keys[name] = sanitize_wandb(name)
        return key

    def start(self, names: Sequence[str], config: dict) -> None:
        if self.run is None:
            self.run = self._wandb.init(**self._init_kwargs)
        if config:
            self.run.config.update({"gradguard": config}, allow_val_change=True)

    def write(self, batch: HostBatch) -> None:
        for step, metrics in step_metrics(batch):
            self.run.log({self._key(k): v for k, v in metrics.items()}, step=step)

    def write_events(self, events: Sequence[Event]) -> None:
        for e, phase in self._episodes.select(events):
            kind = self._key(e.kind)
            if phase == OPENED:
                self._counted.add(e.key)
            if phase != CLOSED or e.key not in self._counted:  # each episode counts once
                self._counts[kind] = self._counts.get(kind, 0) + 1
            self.run.summary[f"events/{kind}/count"] = self._counts[kind]
            self.run.summary[f"events/{kind}/last"] = (
                f"step {step_of(e, phase)}: {describe(e, phase)}"
            )

    def close(self) -> None:
        if self._owns and self.run is not None:
            self.run.finish()
