"""The rule list: every health rule, in evaluation order, and the :class:`Kind` of finding.

Each rule is one class in one file of this folder (its spec, thresholds, detector and
advice; its tests are ``tests/health/rules/test_<file>.py``). Adding a rule means
adding its file and listing it here; :class:`Kind` and ``HealthConfig`` follow.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping

from ..base import Rule
from .amp_overflow import AmpOverflow
from .clip_hovering import ClipHovering
from .clip_inactive import ClipInactive
from .clip_saturated import ClipSaturated
from .dead_layer import DeadLayer
from .exploding import Exploding
from .layer_dispersion import LayerDispersion
from .layer_ratio import LayerRatio
from .loss_divergence import LossDivergence
from .loss_scale_collapse import LossScaleCollapse
from .loss_stall import LossStall
from .lr_change import LRChange
from .nonfinite import NonFinite
from .run_lost import RunLost
from .spike import Spike
from .vanishing import Vanishing
from .vanishing_layer import VanishingLayer

#: Every rule, in the order the monitor runs them on each batch and snapshot.
RULES: tuple[type[Rule], ...] = (
    NonFinite,
    RunLost,
    Spike,
    Exploding,
    Vanishing,
    LRChange,
    LossDivergence,
    LossStall,
    ClipInactive,
    ClipSaturated,
    ClipHovering,
    AmpOverflow,
    LossScaleCollapse,
    DeadLayer,
    VanishingLayer,
    LayerRatio,
    LayerDispersion,
)

#: What went wrong: one member per rule (``Kind.EXPLODING == "exploding"``), the
#: stable string stored in run stores.
Kind = enum.StrEnum(  # type: ignore[misc]
    "Kind", [(rule.kind.upper(), rule.kind) for rule in RULES], module=__name__
)

#: The rule of each kind.
SPECS: Mapping[str, type[Rule]] = {Kind(rule.kind): rule for rule in RULES}

__all__ = ["RULES", "SPECS", "Kind", "Rule"]
