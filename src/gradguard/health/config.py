"""``HealthConfig``: every threshold the rules read, validated at construction.

The thresholds are declared where they are used: the shared ones below, the others by
the rule (``rules/*.py``) or signal (:mod:`.signals`) that reads them, each with its
default, its check and its meaning. ``HealthConfig`` gathers them, so
``HealthConfig(jump_factor=5)`` and ``config.jump_factor`` work for every declared
threshold and an unknown name is an error.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from . import _check as check
from .base import Threshold
from .families import Family, get_family, infer_family

#: Thresholds read by several rules.
SHARED: tuple[Threshold, ...] = (
    Threshold(
        "healthy_range",
        None,
        check.band,
        "healthy total-norm band; None takes the family's",
        family="healthy_range",
    ),
    Threshold(
        "explode_above",
        None,
        check.positive,
        "total norm that, sustained, means exploding; None takes the family's",
        family="explode_above",
    ),
    Threshold("sustain", 5, check.count, "consecutive steps a step condition must hold"),
    Threshold(
        "tensor_sustain", 2, check.count, "consecutive snapshots a layer condition must hold"
    ),
    Threshold(
        "rearm_steps", 100, check.count, "consecutive clear steps before a step finding can recur"
    ),
    Threshold(
        "rearm_snapshots",
        3,
        check.count,
        "consecutive clear snapshots before a layer finding can recur",
    ),
    Threshold(
        "group_by_module",
        True,
        check.boolean,
        "combine per-tensor norms per owning module (a.b.weight → a.b) before the layer "
        "rules; False when names already denote layers",
    ),
)


def thresholds() -> dict[str, Threshold]:
    """Every declared threshold by name: shared, then each signal's, then each rule's."""
    from .rules import RULES
    from .signals import SIGNALS

    found: dict[str, Threshold] = {}
    for owner in (SHARED, *(s.thresholds for s in SIGNALS), *(r.thresholds for r in RULES)):
        for t in owner:
            if t.name in found:
                raise RuntimeError(f"threshold {t.name!r} is declared twice")
            found[t.name] = t
    return found


class HealthConfig:
    """Thresholds of the health rules. Family-dependent values default from the table.

    Args:
        family: model family key (see :data:`~gradguard.health.families.FAMILIES`).
        **overrides: any declared threshold (:func:`thresholds` lists them with their
            meaning), e.g. ``sustain=3`` or ``healthy_range=(0.1, 3.0)``.

    Raises ``TypeError`` for an unknown name or a wrong type and ``ValueError`` for an
    out-of-range value, naming the threshold. Instances are immutable; see :meth:`replace`.
    """

    __slots__ = ("_values",)

    def __init__(self, family: str = "default", **overrides: Any) -> None:
        declared = thresholds()
        unknown = set(overrides) - set(declared)
        if unknown:
            raise TypeError(f"unknown HealthConfig fields: {sorted(unknown)}")
        row = get_family(family)
        values: dict[str, Any] = {"family": row.name}
        for name, t in declared.items():
            value = overrides.get(name, t.default)
            if value is None and t.family is not None:
                value = getattr(row, t.family)
            values[name] = t.check(name, value)
        object.__setattr__(self, "_values", values)
        from .rules import RULES
        from .signals import SIGNALS

        for owner in (*SIGNALS, *RULES):
            owner.check_config(values)

    def __getattr__(self, name: str) -> Any:
        try:
            return self._values[name]
        except KeyError:
            raise AttributeError(f"HealthConfig has no threshold {name!r}") from None

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("HealthConfig is immutable; use config.replace(...)")

    def __iter__(self) -> Iterator[tuple[str, Any]]:
        """``(name, value)`` pairs, the family first."""
        return iter(self._values.items())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, HealthConfig) and self._values == other._values

    def __hash__(self) -> int:
        return hash(tuple(self._values.items()))

    def __repr__(self) -> str:
        return f"HealthConfig({', '.join(f'{k}={v!r}' for k, v in self._values.items())})"

    def __reduce__(self) -> tuple[Any, ...]:
        family = self._values["family"]
        return (_rebuild, (family, {k: v for k, v in self._values.items() if k != "family"}))

    @property
    def family_row(self) -> Family:
        """The family table row this configuration starts from."""
        return get_family(self._values["family"])

    @classmethod
    def for_model(cls, model: object, **overrides: Any) -> HealthConfig:
        """A configuration whose family is inferred from ``model`` (overridable)."""
        family = overrides.pop("family", None) or infer_family(model)
        return cls(family, **overrides)

    def replace(self, **changes: Any) -> HealthConfig:
        """A copy with ``changes`` applied (validated again).

        Family-derived values are already resolved, so changing ``family`` here keeps
        the old ``healthy_range`` and ``explode_above``; build a new config instead.
        """
        values = {k: v for k, v in self._values.items() if k != "family"}
        family = changes.pop("family", self._values["family"])
        return HealthConfig(family, **{**values, **changes})


def _rebuild(family: str, values: dict[str, Any]) -> HealthConfig:
    return HealthConfig(family, **values)
