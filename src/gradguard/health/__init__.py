"""Gradient health: rules with evidence and advice, and clip-threshold advice.

The rules work on host numbers (:class:`~gradguard.schema.HostBatch`) and import
only numpy; :class:`BackwardOrder` and :func:`find_nonfinite_forward` live in
:mod:`.origin`, the one torch-dependent module, and are imported lazily.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .config import HealthConfig
from .families import FAMILIES, Family, family_names, get_family, infer_family
from .findings import Finding, Kind, Severity
from .monitor import HealthMonitor, diagnose
from .rules import RULES, SPECS, RuleSpec
from .threshold import ThresholdAdvice, recommend_threshold

if TYPE_CHECKING:
    from .origin import BackwardOrder, find_nonfinite_forward

_LAZY = {"BackwardOrder", "find_nonfinite_forward"}


def __getattr__(name: str) -> object:
    if name in _LAZY:
        from . import origin

        return getattr(origin, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "FAMILIES",
    "RULES",
    "SPECS",
    "BackwardOrder",
    "Family",
    "Finding",
    "HealthConfig",
    "HealthMonitor",
    "Kind",
    "RuleSpec",
    "Severity",
    "ThresholdAdvice",
    "diagnose",
    "family_names",
    "find_nonfinite_forward",
    "get_family",
    "infer_family",
    "recommend_threshold",
]
