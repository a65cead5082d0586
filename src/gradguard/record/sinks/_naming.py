"""One metric naming convention for every logger, and per-backend name sanitising."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator

from ...schema import HostBatch

#: step column → metric key (columns not listed are not logged as scalars).
METRIC_KEYS: dict[str, str] = {
    "total_norm": "grad/total_norm",
    "clipped_norm": "grad/clipped_norm",
    "clip_coef": "grad/clip_coef",
    "threshold": "grad/threshold",
    "clipped": "grad/clipped",
    "skipped": "grad/skipped",
    "reason": "grad/skip_reason",
    "loss": "train/loss",
    "lr": "train/lr",
    "loss_scale": "amp/loss_scale",
}
TENSOR_PREFIX = "grad/norm/"

_TENSORBOARD = re.compile(r"[^\w./-]")  # what TensorBoard keeps in a tag
_MLFLOW = re.compile(r"[^A-Za-z0-9_\-. /]")  # MLflow: alphanumerics, _ - . space /
_WANDB = re.compile(r"[^\w./ -]")


def _sub(pattern: re.Pattern[str]) -> Callable[[str], str]:
    return lambda name: pattern.sub("_", name)


sanitize_tensorboard = _sub(_TENSORBOARD)
sanitize_mlflow = _sub(_MLFLOW)
sanitize_wandb = _sub(_WANDB)


def tensor_key(name: str, sanitize: Callable[[str], str]) -> str:
    """``grad/norm/<name>``, with ``name`` made legal for the backend (dots kept)."""
    return TENSOR_PREFIX + sanitize(name)


def step_metrics(batch: HostBatch) -> Iterator[tuple[int, dict[str, float]]]:
    """Per step: ``{metric key: value}`` for every column given in the batch.

    Per-tensor norms are merged into the step they were snapshotted at (keys are raw
    ``grad/norm/<name>``; sanitise them per backend). Infinite and NaN values are kept.
    """
    snaps = dict(zip(batch.tensor_steps, batch.tensor_norms))
    keys = [(c, k) for c, k in METRIC_KEYS.items() if c not in batch.absent]
    seen = set()
    for i, step in enumerate(batch.steps):
        row = {k: float(batch.columns[c][i]) for c, k in keys}
        norms = snaps.get(step)
        if norms is not None:
            seen.add(step)
            row.update((TENSOR_PREFIX + n, float(v)) for n, v in zip(batch.names, norms))
        yield step, row
    for step, norms in snaps.items():  # snapshots at steps outside the batch's steps
        if step not in seen:
            yield step, {TENSOR_PREFIX + n: float(v) for n, v in zip(batch.names, norms)}


def missing(extra: str, package: str) -> ImportError:
    """The ImportError raised when a sink's backend is not installed."""
    return ImportError(f"this sink needs {package}: pip install 'gradguard[{extra}]'")
