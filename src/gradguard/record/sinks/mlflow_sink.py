"""MLflow sink (extra ``gradguard[mlflow]``): one batched ``log_batch`` per flush."""

from __future__ import annotations

import time
from collections.abc import Sequence

from ...schema import Event, HostBatch
from ._episodes import EpisodeLog, describe, step_of
from ._naming import missing, sanitize_mlflow, step_metrics

_MAX_BATCH = 1000  # MLflow's limit of metrics per log_batch call
_MAX_PARAM = 6000  # MLflow's limit on a param value's length


class MLflowSink:
    """Logs ``grad/...`` metrics to an MLflow run.

    Args:
        tracking_uri: e.g. ``"sqlite:///mlflow.db"`` or a ``file:`` URI; ``None`` uses
            MLflow's default (``MLFLOW_TRACKING_URI`` or ``./mlruns``).
        run_id: log into this existing run (not ended by us); ``None`` creates a run.
        experiment_name: experiment for a created run (default ``"gradguard"``).
        run_name: name of a created run.
    """

    def __init__(
        self,
        tracking_uri: str | None = None,
        run_id: str | None = None,
        experiment_name: str = "gradguard",
        run_name: str | None = None,
    ) -> None:
        try:
            import mlflow  # noqa: F401
            from mlflow.entities import Metric, Param
            from mlflow.tracking import MlflowClient
        except ImportError as e:
            raise missing("mlflow", "mlflow") from e
        self._Metric, self._Param = Metric, Param
        self.client = MlflowClient(tracking_uri=tracking_uri)
        self.run_id = run_id
        self._owns = run_id is None
        self._experiment_name = experiment_name
        self._run_name = run_name
        self._keys: dict[str, str] = {}
        self._episodes = EpisodeLog()

    def _key(self, name: str) -> str:
        key = self._keys.get(name)
        if key is None:
            key = self._keys[name] = sanitize_mlflow(name)
        return key

    def start(self, names: Sequence[str], config: dict) -> None:
        if self.run_id is None:
            exp = self.client.get_experiment_by_name(self._experiment_name)
            exp_id = (
                exp.experiment_id
                if exp is not None
                else self.client.create_experiment(self._experiment_name)
            )
            self.run_id = self.client.create_run(exp_id, run_name=self._run_name).info.run_id
        params = [
            self._Param(self._key(f"gradguard.{k}"), str(v)[:_MAX_PARAM])
            for k, v in sorted(config.items())
        ]
        for i in range(0, len(params), 100):
            self.client.log_batch(self.run_id, params=params[i : i + 100])

    def write(self, batch: HostBatch) -> None:
        now = int(time.time() * 1000)
        metrics = [
            self._Metric(self._key(k), v, now, step)
            for step, row in step_metrics(batch)
            for k, v in row.items()
        ]
        for i in range(0, len(metrics), _MAX_BATCH):
            self.client.log_batch(self.run_id, metrics=metrics[i : i + _MAX_BATCH])

    def write_events(self, events: Sequence[Event]) -> None:
        for e, phase in self._episodes.select(events):
            text = f"step {step_of(e, phase)}: {describe(e, phase)}"
            self.client.set_tag(self.run_id, self._key(f"gradguard.event.{e.kind}"), text)

    def close(self) -> None:
        if self._owns and self.run_id is not None:
            self.client.set_terminated(self.run_id)
