"""TensorBoard sink: ``SummaryWriter.add_scalar`` per metric (extra ``gradguard[tensorboard]``)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from ...schema import Event, HostBatch
from ._episodes import EpisodeLog, describe, step_of
from ._naming import missing, sanitize_tensorboard, step_metrics


class TensorBoardSink:
    """Writes ``grad/...`` scalars to TensorBoard event files.

    Args:
        log_dir: directory for event files (ignored when ``writer`` is given).
        writer: an existing ``torch.utils.tensorboard.SummaryWriter`` (not closed by us).
        histograms_every: also log a histogram of the per-tensor norms at snapshot steps
            that are multiples of this; ``None`` for none.
    """

    def __init__(
        self,
        log_dir: str | os.PathLike[str] | None = None,
        writer: Any = None,
        histograms_every: int | None = None,
    ) -> None:
        if histograms_every is not None and (
            not isinstance(histograms_every, int) or histograms_every < 1
        ):
            raise ValueError(
                f"histograms_every must be a positive int or None, got {histograms_every!r}"
            )
        if writer is None:
            try:
                import tensorboard  # noqa: F401  (torch's writer needs the package)
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise missing("tensorboard", "tensorboard") from e
            writer = SummaryWriter(log_dir=None if log_dir is None else str(log_dir))
            self._owns = True
        else:
            self._owns = False
        self.writer = writer
        self.histograms_every = histograms_every
        self._keys: dict[str, str] = {}
        self._episodes = EpisodeLog()

    def _key(self, name: str) -> str:
        key = self._keys.get(name)
        if key is None:
            key = self._keys[name] = sanitize_tensorboard(name)
        return key

    def start(self, names: Sequence[str], config: dict) -> None:
        if config:
            lines = "\n".join(f"    {k}: {v!r}" for k, v in sorted(config.items()))
            self.writer.add_text("gradguard/config", lines, 0)

    def write(self, batch: HostBatch) -> None:
        for step, metrics in step_metrics(batch):
            for name, value in metrics.items():
                self.writer.add_scalar(self._key(name), value, step)
        if self.histograms_every:
            import numpy as np

            for step, norms in zip(batch.tensor_steps, batch.tensor_norms):
                values = np.asarray(norms, dtype=np.float64)
                values = values[np.isfinite(values)]
                if step % self.histograms_every == 0 and values.size:
                    self.writer.add_histogram("grad/norm_histogram", values, step)
        self.writer.flush()

    def write_events(self, events: Sequence[Event]) -> None:
        for e, phase in self._episodes.select(events):
            self.writer.add_text(
                self._key(f"events/{e.kind}"), describe(e, phase), step_of(e, phase)
            )
        self.writer.flush()

    def close(self) -> None:
        if self._owns:
            self.writer.close()
        else:
            self.writer.flush()
