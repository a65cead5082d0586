"""``HealthConfig``: every threshold the rules use, validated at construction."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

from . import _check as check
from .families import Family, get_family, infer_family


@dataclass(frozen=True)
class HealthConfig:
    """Thresholds of the health rules. Family-dependent values default from the table.

    Attributes:
        family: model family key (see :data:`~gradguard.health.families.FAMILIES`).
        healthy_range: healthy total-norm band; ``None`` takes the family's.
        explode_above: total norm that, sustained, means exploding; ``None`` → family's.
        vanish_total: total norm below which, sustained, gradients vanish (seed 000: 1e-6).
        vanish_layer: layer norm below which a layer's gradient vanishes (seed 003: 1e-8).
        vanish_layer_relative: a layer also vanishes below this fraction of the largest
            layer norm in the same snapshot (catches deep sigmoid stacks whose output
            layer still gets large gradients).
        layer_ratio: adjacent-layer norm ratio above which the layer view is unbalanced.
        dispersion_ratio: the layer norms of one snapshot are too dispersed when their
            standard deviation exceeds this many times their mean (seed 003 uses 5). The
            population std of n positive values is at most sqrt(n - 1) × their mean, so
            5 can only be reached with 27 or more layers; the default 3 is reachable from
            11 layers and still needs one layer far above the rest (see the rule table).
        jump_factor: a step this many times above the recent median is an outlier.
        jump_sustain: outliers this many steps in a row are a jump (exploding); fewer
            are a spike.
        baseline_window: steps in the rolling median the outliers are judged against.
        min_history: steps needed in the baseline before outliers are judged.
        sustain: consecutive steps a step condition must hold before it is reported.
        tensor_sustain: consecutive per-tensor snapshots a layer condition must hold.
        rearm_steps: consecutive clear steps before a step finding can fire again.
        rearm_snapshots: consecutive clear snapshots before a layer finding can fire again.
        clip_window: steps over which clip activity is read.
        clip_idle_below: a step under this fraction of the threshold leaves clipping idle
            (seed 004: 0.3).
        clip_idle_share: share of idle steps that means clipping never acts.
        clip_saturated_share: share of clipped steps that means clipping almost always acts.
        hover_band: ``(low, high)`` band of ``norm / threshold`` counted as at the threshold.
        hover_share: share of steps in ``hover_band`` that means the norm hovers there.
        stall_window: steps over which the loss trend is read (two halves compared).
        stall_tolerance: relative loss improvement between halves below which loss stalls.
        amp_overflow_rate: share of AMP-overflow skips among the last ``amp_window``
            steps above which the loss scale keeps backing off.
        amp_window: steps over which AMP-overflow skips are counted.
        amp_warmup: first steps ignored by the AMP-overflow rule (a GradScaler starts
            with a large scale and overflows while it calibrates).
        group_by_module: combine per-tensor norms per owning module (``a.b.weight`` →
            ``a.b``) before the layer rules; ``False`` when names already denote layers.
    """

    family: str = "default"
    healthy_range: tuple[float, float] | None = None
    explode_above: float | None = None
    vanish_total: float = 1e-6
    vanish_layer: float = 1e-8
    vanish_layer_relative: float = 1e-5
    layer_ratio: float = 100.0
    dispersion_ratio: float = 3.0
    jump_factor: float = 10.0
    jump_sustain: int = 3
    baseline_window: int = 32
    min_history: int = 8
    sustain: int = 5
    tensor_sustain: int = 2
    rearm_steps: int = 100
    rearm_snapshots: int = 3
    clip_window: int = 100
    clip_idle_below: float = 0.3
    clip_idle_share: float = 0.9
    clip_saturated_share: float = 0.9
    hover_band: tuple[float, float] = (0.8, 1.25)
    hover_share: float = 0.5
    stall_window: int = 200
    stall_tolerance: float = 0.01
    amp_overflow_rate: float = 0.05
    amp_window: int = 200
    amp_warmup: int = 100
    group_by_module: bool = True

    def __post_init__(self) -> None:
        row = get_family(self.family)
        healthy = row.healthy_range if self.healthy_range is None else self.healthy_range
        explode = row.explode_above if self.explode_above is None else self.explode_above
        set_ = object.__setattr__
        set_(self, "healthy_range", check.band("healthy_range", healthy))
        set_(self, "explode_above", check.positive("explode_above", explode))
        for name in ("vanish_total", "vanish_layer", "stall_tolerance", "dispersion_ratio"):
            set_(self, name, check.positive(name, getattr(self, name)))
        set_(
            self,
            "vanish_layer_relative",
            check.fraction("vanish_layer_relative", self.vanish_layer_relative),
        )
        for name in ("layer_ratio", "jump_factor"):
            value = check.positive(name, getattr(self, name))
            if value <= 1.0:
                raise ValueError(f"{name} must be > 1, got {value}")
            set_(self, name, value)
        for name in (
            "jump_sustain",
            "baseline_window",
            "min_history",
            "sustain",
            "tensor_sustain",
            "rearm_steps",
            "rearm_snapshots",
        ):
            check.count(name, getattr(self, name))
        check.count("clip_window", self.clip_window, minimum=2)
        check.count("stall_window", self.stall_window, minimum=4)
        check.count("amp_window", self.amp_window, minimum=2)
        check.count("amp_warmup", self.amp_warmup, minimum=0)
        if self.min_history > self.baseline_window:
            raise ValueError(
                f"min_history must be <= baseline_window ({self.baseline_window}), "
                f"got {self.min_history}"
            )
        for name in (
            "clip_idle_below",
            "clip_idle_share",
            "clip_saturated_share",
            "hover_share",
            "amp_overflow_rate",
        ):
            set_(self, name, check.fraction(name, getattr(self, name)))
        low, high = check.band("hover_band", self.hover_band)
        if not low < 1.0 < high:
            raise ValueError(f"hover_band must contain 1.0 strictly inside, got ({low}, {high})")
        set_(self, "hover_band", (low, high))
        if not isinstance(self.group_by_module, bool):
            raise TypeError(
                f"group_by_module must be a bool, got {type(self.group_by_module).__name__}"
            )

    @property
    def family_row(self) -> Family:
        """The family table row this configuration starts from."""
        return get_family(self.family)

    @classmethod
    def for_model(cls, model: object, **overrides: object) -> HealthConfig:
        """A configuration whose family is inferred from ``model`` (overridable)."""
        overrides.setdefault("family", infer_family(model))
        return cls(**overrides)  # type: ignore[arg-type]

    def replace(self, **changes: object) -> HealthConfig:
        """A copy with ``changes`` applied (validated again).

        Family-derived values are already resolved, so changing ``family`` here keeps
        the old ``healthy_range`` and ``explode_above``; build a new config instead.
        """
        known = {f.name for f in fields(self)}
        unknown = set(changes) - known
        if unknown:
            raise TypeError(f"unknown HealthConfig fields: {sorted(unknown)}")
        return replace(self, **changes)  # type: ignore[arg-type]
