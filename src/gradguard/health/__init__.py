"""Gradient health: rules with evidence and advice, and clip-threshold advice.

The rules work on host numbers (:class:`~gradguard.schema.HostBatch`) and need only
numpy: importing this package does not import torch. :class:`BackwardOrder` and
:func:`find_nonfinite_forward` live in :mod:`.origin`, the one torch-dependent module,
and are imported on first use.

Layout: ``rules/`` holds one file per rule (its spec, thresholds, detector and advice)
and the rule list; :mod:`.monitor` dispatches recorded steps to them; :mod:`.signals`
holds measurements several rules share; :mod:`.config` gathers every rule's thresholds.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import Rule, Threshold
from .config import HealthConfig, thresholds
from .families import FAMILIES, Family, family_names, get_family, infer_family
from .findings import Finding, Severity
from .monitor import HealthMonitor, diagnose
from .rules import RULES, SPECS, Kind
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
    "Rule",
    "Severity",
    "Threshold",
    "ThresholdAdvice",
    "diagnose",
    "family_names",
    "find_nonfinite_forward",
    "get_family",
    "infer_family",
    "recommend_threshold",
    "thresholds",
]
