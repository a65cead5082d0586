"""The policies compared: no clipping, a sweep of fixed thresholds, each adaptive default."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import gradguard as gg
from gradguard.ops import Ops
from gradguard.policies import Decision, StepInputs

PolicyFactory = Callable[[], gg.Policy]

#: Name of the row that trains with no clipping at all (still through the guard).
NONE = "none"
#: Name of the row for ``gradguard.default_policy()``: ``chain(SkipNonFinite(), FeedbackClip())``.
DEFAULT = "default"
#: Name of the row for the default until FeedbackClip replaced it.
OLD_DEFAULT = "ZClip (old default)"
#: A row named ``"<row> + rewind"`` trains ``<row>``'s policy with :class:`gradguard.Rewind`.
REWIND = " + rewind"
#: The rewinder's settings in the ``+ rewind`` rows.
REWIND_SETTINGS: dict = {}


class NoClip(gg.Policy):
    """Measure through the guard but change nothing: the unguarded baseline."""

    def update(self, state: Any, inputs: StepInputs, xp: Ops) -> tuple[Decision, Any]:
        return Decision(), state


def old_default() -> gg.Policy:
    """The default policy until FeedbackClip replaced it: ZClip, warm-up capped at 10."""
    return gg.chain(gg.SkipNonFinite(), gg.ZClip(warmup_max_norm=10.0))


def fixed_name(threshold: float) -> str:
    """Row name of fixed global-norm clipping at ``threshold``."""
    return f"clip {threshold:g}"


def adaptive() -> dict[str, PolicyFactory]:
    """Each adaptive policy at its defaults, and the library default."""
    return {
        "AutoClip": lambda: gg.AutoClip(),
        "ZClip": lambda: gg.ZClip(),
        "SkipSpike+clip 1": lambda: gg.chain(gg.SkipSpike(), gg.ClipNorm(1.0)),
        DEFAULT: gg.default_policy,
        OLD_DEFAULT: old_default,
    }


def roster(thresholds: Sequence[float]) -> dict[str, PolicyFactory]:
    """No clipping, fixed clipping at every threshold of the sweep, then the adaptive rows."""
    rows: dict[str, PolicyFactory] = {NONE: NoClip}
    for t in thresholds:
        rows[fixed_name(t)] = lambda t=t: gg.ClipNorm(t)
    rows.update(adaptive())
    return rows


def row_names(thresholds: Sequence[float]) -> list[str]:
    """The rows of a hard task: the roster, then the default with rewind."""
    return [*roster(thresholds), DEFAULT + REWIND]


def is_fixed(name: str) -> bool:
    """Whether a row is one threshold of the fixed sweep."""
    return name.startswith("clip ") and not name.endswith(REWIND)


def resolve(name: str, thresholds: Sequence[float]) -> tuple[PolicyFactory, dict | None]:
    """The policy factory of a row and its rewinder settings (``None``: no rewind)."""
    base = name.removesuffix(REWIND)
    if base.startswith("fb:"):  # a prototype with knobs: "fb:spike=3;interval=30"
        from .candidates import parse

        return parse(base), (dict(REWIND_SETTINGS) if name.endswith(REWIND) else None)
    rows = roster(thresholds)
    if base not in rows:
        raise ValueError(f"rows: unknown policy {name!r}; known: {list(rows)}")
    return rows[base], (dict(REWIND_SETTINGS) if name.endswith(REWIND) else None)
