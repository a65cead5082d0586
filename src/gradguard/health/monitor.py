"""Online and offline evaluation of the health rules over recorded host numbers.

:class:`HealthMonitor` consumes :class:`~gradguard.schema.HostBatch` chunks as
they are flushed and returns new findings. Its state is bounded (rolling windows of
fixed size, run counters and latches per rule and per layer), so each update costs
time proportional to the batch, not to the run. :func:`diagnose` replays a whole
recorded run through a monitor.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Protocol

import numpy as np

from ..layers import group_index
from ..schema import HostBatch, SkipReason
from ._state import FlagWindow, HalvesTrend, Latch, RollingMedian, Run
from .config import HealthConfig
from .findings import Finding, Kind
from .rules import make_finding
from .threshold import recommend_threshold

_NAN = float("nan")
_IDLE, _CLIPPED, _HOVER = 0, 1, 2


class OrderLike(Protocol):
    """Anything that names the first non-finite parameter in backward order."""

    def first_nonfinite(self, names_or_flags: Sequence[str]) -> str | None: ...


class HealthMonitor:
    """Evaluate the health rules incrementally, emitting each finding once.

    A finding is emitted when its condition starts (after being sustained as the
    configuration asks) and is re-armed only after the condition has stayed clear for
    ``rearm_steps`` steps (``rearm_snapshots`` snapshots for layer rules).

    Args:
        config: rule thresholds; ``HealthConfig()`` by default.
        order: a :class:`~gradguard.health.origin.BackwardOrder` (or anything with
            ``first_nonfinite(names)``) to locate the origin of non-finite gradients.
            Without one the origin is approximated by reverse registration order.
    """

    def __init__(self, config: HealthConfig | None = None, *, order: OrderLike | None = None):
        if config is None:
            config = HealthConfig()
        if not isinstance(config, HealthConfig):
            raise TypeError(f"config must be a HealthConfig, got {type(config).__name__}")
        self.config = config
        self.order = order
        self.reset()

    def reset(self) -> None:
        """Forget everything seen so far."""
        c = self.config
        self._latches: dict[object, Latch] = {}
        self._runs: dict[object, Run] = {}
        self._baseline = RollingMedian(c.baseline_window)
        self._outlier = Run()
        self._outlier_base = _NAN
        self._last_step = 0
        self._clip = FlagWindow(c.clip_window, 3)
        half = c.stall_window // 2
        self._loss = HalvesTrend(half)
        self._large = FlagWindow(2 * half, 1)
        self._amp = FlagWindow(c.amp_window, 1)  # overflow flags, loss scale as the value
        self._amp_seen = 0
        #: Findings emitted so far, per kind.
        self.counts: dict[Kind, int] = {}

    # ----------------------------------------------------------------- plumbing

    def _fire(self, key: object, active: bool, rearm: int) -> bool:
        latch = self._latches.get(key)
        if latch is None:
            latch = self._latches[key] = Latch()
        return latch.update(active, rearm)

    def _run(self, key: object) -> Run:
        run = self._runs.get(key)
        if run is None:
            run = self._runs[key] = Run()
        return run

    def update(self, batch: HostBatch) -> list[Finding]:
        """Evaluate the rules on one flushed batch; return the findings that start in it."""
        n = len(batch.steps)
        for name, values in batch.columns.items():
            if len(values) != n:
                raise ValueError(f"batch.columns[{name!r}] has {len(values)} values for {n} steps")
        if len(batch.tensor_steps) != len(batch.tensor_norms):
            raise ValueError(
                f"batch.tensor_steps has {len(batch.tensor_steps)} entries but "
                f"batch.tensor_norms has {len(batch.tensor_norms)}"
            )
        names = tuple(batch.names)
        snapshots = dict(zip(batch.tensor_steps, batch.tensor_norms))

        def column(name: str) -> Sequence[float]:
            values = batch.columns.get(name)
            return values if values is not None else [_NAN] * n

        out: list[Finding] = []
        rows = zip(
            batch.steps,
            column("total_norm"),
            column("threshold"),
            column("clipped"),
            column("skipped"),
            column("reason"),
            column("loss"),
            column("loss_scale"),
        )
        for step, norm, threshold, clipped, skipped, reason, loss, scale in rows:
            self._amp_overflow(
                int(step), skipped == 1.0 and reason == SkipReason.AMP_OVERFLOW, float(scale), out
            )
            self._step(
                int(step),
                float(norm),
                float(threshold),
                float(clipped),
                skipped == 1.0,
                reason,
                float(loss),
                snapshots,
                names,
                out,
            )
        for step, norms in zip(batch.tensor_steps, batch.tensor_norms):
            self._layers(int(step), names, [float(v) for v in norms], out)
        out.sort(key=lambda f: f.steps[1])  # the step each finding was decided at
        for finding in out:
            self.counts[finding.kind] = self.counts.get(finding.kind, 0) + 1
        return out

    # --------------------------------------------------------------- step rules

    def _step(
        self,
        step: int,
        norm: float,
        threshold: float,
        clipped: float,
        skipped: bool,
        reason: float,
        loss: float,
        snapshots: Mapping[int, Sequence[float]],
        names: tuple[str, ...],
        out: list[Finding],
    ) -> None:
        c = self.config
        if skipped and reason == SkipReason.AMP_OVERFLOW:
            return  # the GradScaler handles its own overflows; the norm is of scaled grads
        finite = math.isfinite(norm)
        bad = not finite or (skipped and reason == SkipReason.NONFINITE)
        if self._fire(Kind.NONFINITE, bad, c.rearm_steps):
            out.append(self._nonfinite(step, norm, snapshots.get(step), names))
        if not finite:
            return  # nothing non-finite enters a window or a baseline
        self._magnitude(step, norm, out)
        self._clip_activity(step, norm, threshold, clipped, out)
        self._loss_stall(step, norm, loss, out)
        self._last_step = step

    def _nonfinite(
        self, step: int, norm: float, snapshot: Sequence[float] | None, names: tuple[str, ...]
    ) -> Finding:
        evidence: dict[str, float] = {"total_norm": norm}
        params: tuple[str, ...] = ()
        extra: tuple[str, ...] = ()
        origin = None
        if snapshot is not None and names and len(snapshot) == len(names):
            bad = [name for name, v in zip(names, snapshot) if not math.isfinite(float(v))]
            evidence.update(nonfinite_tensors=len(bad), tensors=len(names))
            if bad:
                if self.order is not None:
                    origin = self.order.first_nonfinite(bad)
                exact = origin is not None
                if origin is None:
                    origin = bad[-1]  # reverse registration order approximates backward
                evidence["origin_exact"] = float(exact)
                params = (origin, *(name for name in bad if name != origin))
        else:
            extra = ("Record per-tensor norms at non-finite steps to locate the origin.",)
        where = f"; origin {origin}" if origin else ""
        message = f"non-finite gradient at step {step}{where}"
        return make_finding(
            self.config, Kind.NONFINITE, (step, step), message, evidence, params, extra
        )

    def _magnitude(self, step: int, norm: float, out: list[Finding]) -> None:
        c = self.config
        ratio = _NAN
        if len(self._baseline) >= c.min_history and norm > 0.0:
            base = 10.0 ** self._baseline.median()
            ratio = norm / base
        outlier = ratio >= c.jump_factor
        before, first, peak = self._outlier.length, self._outlier.first, self._outlier.peak
        if outlier and before == 0:
            self._outlier_base = norm / ratio
        length = self._outlier.update(outlier, step, ratio)
        spike_ended = not outlier and 0 < before < c.jump_sustain
        if self._fire(Kind.SPIKE, spike_ended, c.rearm_steps):
            base = self._outlier_base
            out.append(
                make_finding(
                    c,
                    Kind.SPIKE,
                    (first, self._last_step),
                    f"gradient norm spiked {peak:.0f}× above its recent median ({base:.3g}) "
                    f"for {before} step(s)",
                    {"peak_ratio": peak, "baseline_median": base, "length": before},
                )
            )
        above = self._run("above").update(norm > c.explode_above, step, norm)
        jump = outlier and length >= c.jump_sustain
        sustained = above >= c.sustain
        if self._fire(Kind.EXPLODING, jump or sustained, c.rearm_steps):
            if sustained:
                run = self._run("above")
                message = (
                    f"gradient norm above {c.explode_above:g} for {above} steps "
                    f"(now {norm:.3g}; healthy up to {c.healthy_range[1]:g})"
                )
                evidence = {
                    "total_norm": norm,
                    "peak": run.peak,
                    "steps_above": above,
                    "explode_above": c.explode_above,
                    "healthy_high": c.healthy_range[1],
                }
                first_step = run.first
            else:
                base = self._outlier_base
                message = (
                    f"gradient norm jumped {self._outlier.peak:.0f}× above its recent "
                    f"median ({base:.3g} → {norm:.3g}) and stayed there"
                )
                evidence = {
                    "total_norm": norm,
                    "peak_ratio": self._outlier.peak,
                    "baseline_median": base,
                    "steps_above": length,
                }
                first_step = self._outlier.first
            out.append(make_finding(c, Kind.EXPLODING, (first_step, step), message, evidence))
        low = self._run("low").update(norm < c.vanish_total, step, norm)
        if self._fire(Kind.VANISHING, low >= c.sustain, c.rearm_steps):
            out.append(
                make_finding(
                    c,
                    Kind.VANISHING,
                    (self._run("low").first, step),
                    f"gradient norm below {c.vanish_total:g} for {low} steps (now {norm:.2e})",
                    {"total_norm": norm, "vanish_total": c.vanish_total, "steps_below": low},
                )
            )
        if norm > 0.0:
            self._baseline.push(math.log10(norm))

    def _clip_activity(
        self, step: int, norm: float, threshold: float, clipped: float, out: list[Finding]
    ) -> None:
        c = self.config
        if not (math.isfinite(threshold) and threshold > 0.0):
            return  # no clip in force: clip activity says nothing
        r = norm / threshold
        was_clipped = clipped == 1.0 if math.isfinite(clipped) else r > 1.0
        low, high = c.hover_band
        window = self._clip
        window.push((r < c.clip_idle_below, was_clipped, low <= r <= high), norm)
        idle = hover = saturated = False
        if window.full:
            idle = window.share(_IDLE) >= c.clip_idle_share
            hover = window.share(_HOVER) >= c.hover_share
            saturated = window.share(_CLIPPED) >= c.clip_saturated_share and not hover
        first = step - len(window) + 1
        if self._fire(Kind.CLIP_INACTIVE, idle, c.rearm_steps):
            try:
                advice = recommend_threshold(list(window.values), min_samples=1)
                median, suggested = advice.median, advice.threshold
            except ValueError:  # all-zero norms: nothing to recommend
                median = suggested = 0.0
            out.append(
                make_finding(
                    c,
                    Kind.CLIP_INACTIVE,
                    (first, step),
                    f"clipping never acts: {window.share(_IDLE):.0%} of the last {len(window)} "
                    f"steps are below {c.clip_idle_below:g}× the threshold {threshold:g}",
                    {
                        "idle_share": window.share(_IDLE),
                        "threshold": threshold,
                        "median_norm": median,
                        "recommended_threshold": suggested,
                    },
                )
            )
        if self._fire(Kind.CLIP_SATURATED, saturated, c.rearm_steps):
            median = float(np.median(np.asarray(window.values)))
            out.append(
                make_finding(
                    c,
                    Kind.CLIP_SATURATED,
                    (first, step),
                    f"clipping acts on {window.share(_CLIPPED):.0%} of the last {len(window)} "
                    f"steps; median norm {median / threshold:.3g}× the threshold {threshold:g}",
                    {
                        "clipped_share": window.share(_CLIPPED),
                        "threshold": threshold,
                        "median_norm": median,
                    },
                )
            )
        if self._fire(Kind.CLIP_HOVERING, hover, c.rearm_steps):
            out.append(
                make_finding(
                    c,
                    Kind.CLIP_HOVERING,
                    (first, step),
                    f"gradient norm hovers at the clip threshold {threshold:g}: "
                    f"{window.share(_HOVER):.0%} of the last {len(window)} steps within "
                    f"{low:g}–{high:g}× of it",
                    {
                        "hover_share": window.share(_HOVER),
                        "threshold": threshold,
                        "clipped_share": window.share(_CLIPPED),
                    },
                )
            )

    def _loss_stall(self, step: int, norm: float, loss: float, out: list[Finding]) -> None:
        c = self.config
        if not math.isfinite(loss):
            return
        self._loss.push(loss)
        self._large.push((norm > c.healthy_range[1],), norm)
        stalled = False
        old = new = improvement = _NAN
        if self._loss.full:
            old, new = self._loss.means()
            improvement = (old - new) / max(abs(old), 1e-12)
            stalled = improvement < c.stall_tolerance and self._large.share(0) >= 0.5
        if self._fire(Kind.LOSS_STALL, stalled, c.rearm_steps):
            window = len(self._large)
            out.append(
                make_finding(
                    c,
                    Kind.LOSS_STALL,
                    (step - window + 1, step),
                    f"loss flat over {window} steps ({old:.4g} → {new:.4g}) while gradient "
                    f"norms stay above {c.healthy_range[1]:g}",
                    {
                        "loss_old": old,
                        "loss_new": new,
                        "improvement": improvement,
                        "large_share": self._large.share(0),
                        "healthy_high": c.healthy_range[1],
                    },
                )
            )

    def _amp_overflow(self, step: int, overflow: bool, scale: float, out: list[Finding]) -> None:
        c = self.config
        self._amp_seen += 1
        if self._amp_seen <= c.amp_warmup:
            return  # the GradScaler is still calibrating its scale
        window = self._amp
        window.push((overflow,), scale)
        count = window.counts[0]
        # counted against the full window: a partial window fires only once its count
        # alone already exceeds the allowed share of amp_window
        active = count > c.amp_overflow_rate * c.amp_window
        if not self._fire(Kind.AMP_OVERFLOW, active, c.rearm_steps):
            return
        seen = len(window)
        evidence = {
            "rate": count / seen,
            "overflows": count,
            "window": seen,
            "amp_overflow_rate": c.amp_overflow_rate,
        }
        message = (
            f"AMP overflow skipped {count} of the last {seen} steps ({count / seen:.1%}; "
            f"limit {c.amp_overflow_rate:.1%})"
        )
        scales = [v for v in window.values if math.isfinite(v) and v > 0.0]
        if scales:
            first, last, low = scales[0], scales[-1], min(scales)
            evidence.update(loss_scale_first=first, loss_scale_last=last, loss_scale_min=low)
            evidence["loss_scale_trend"] = last / first
            message += f"; loss scale {first:g} → {last:g} (min {low:g})"
        out.append(make_finding(c, Kind.AMP_OVERFLOW, (step - seen + 1, step), message, evidence))

    # -------------------------------------------------------------- layer rules

    def _group(
        self, names: tuple[str, ...], norms: list[float]
    ) -> tuple[tuple[str, ...], list[float]]:
        if not self.config.group_by_module:
            return names, norms
        groups, index = group_index(names)
        sums = [0.0] * len(groups)
        for i, v in zip(index, norms):
            sums[i] += v * v
        return groups, [math.sqrt(s) for s in sums]

    def _layers(
        self, step: int, names: tuple[str, ...], norms: list[float], out: list[Finding]
    ) -> None:
        c = self.config
        if not names:
            names = tuple(f"tensor[{i}]" for i in range(len(norms)))
        if len(names) != len(norms):
            raise ValueError(
                f"batch.tensor_norms rows have {len(norms)} values for {len(names)} names"
            )
        if not norms or not all(math.isfinite(v) for v in norms):
            return  # the non-finite rule speaks for this snapshot
        layers, values = self._group(names, norms)
        largest = max(values)
        dead: list[tuple[str, float, int]] = []
        vanishing: list[tuple[str, float, int]] = []
        weak: set[str] = set()  # dead or vanishing now: their own findings explain them
        for name, v in zip(layers, values):
            is_dead = v == 0.0
            is_low = not is_dead and (v < c.vanish_layer or v < c.vanish_layer_relative * largest)
            if is_dead or is_low:
                weak.add(name)
            for kind, hit, found in (
                (Kind.DEAD_LAYER, is_dead, dead),
                (Kind.VANISHING_LAYER, is_low, vanishing),
            ):
                run = self._run((kind, name))
                held = run.update(hit, step, v)
                if self._fire((kind, name), held >= c.tensor_sustain, c.rearm_snapshots):
                    found.append((name, v, run.first))
        ratios: list[tuple[str, str, float, int]] = []
        adjacent_jump = False
        for (a, va), (b, vb) in zip(zip(layers, values), zip(layers[1:], values[1:])):
            comparable = a not in weak and b not in weak
            ratio = max(va, vb) / min(va, vb) if comparable else 1.0
            adjacent_jump |= ratio > c.layer_ratio
            run = self._run((Kind.LAYER_RATIO, a, b))
            held = run.update(ratio > c.layer_ratio, step, ratio)
            if self._fire((Kind.LAYER_RATIO, a, b), held >= c.tensor_sustain, c.rearm_snapshots):
                ratios.append((a, b, ratio, run.first))
        self._dispersion(step, layers, values, weak, adjacent_jump, out)
        if dead:
            out.append(
                make_finding(
                    c,
                    Kind.DEAD_LAYER,
                    (min(f for *_, f in dead), step),
                    f"{len(dead)} layer(s) get exactly zero gradient, e.g. {dead[0][0]}",
                    {"layers": len(dead), "largest_layer_norm": largest},
                    tuple(name for name, *_ in dead),
                )
            )
        if vanishing:
            name, v, _ = min(vanishing, key=lambda item: item[1])
            out.append(
                make_finding(
                    c,
                    Kind.VANISHING_LAYER,
                    (min(f for *_, f in vanishing), step),
                    f"{len(vanishing)} layer(s) with vanishing gradients; smallest {name}: "
                    f"{v:.2e} ({v / largest:.1e} of the largest layer norm {largest:.3g})",
                    {
                        "layers": len(vanishing),
                        "min_norm": v,
                        "largest_layer_norm": largest,
                        "min_share": v / largest,
                    },
                    tuple(name for name, *_ in vanishing),
                )
            )
        if ratios:
            a, b, ratio, _ = max(ratios, key=lambda item: item[2])
            out.append(
                make_finding(
                    c,
                    Kind.LAYER_RATIO,
                    (min(f for *_, f in ratios), step),
                    f"adjacent layers differ by up to {ratio:.0f}× ({a} vs {b}); "
                    f"limit {c.layer_ratio:g}×",
                    {"max_ratio": ratio, "pairs": len(ratios), "layer_ratio": c.layer_ratio},
                    tuple(dict.fromkeys(name for a, b, *_ in ratios for name in (a, b))),
                )
            )

    def _dispersion(
        self,
        step: int,
        layers: tuple[str, ...],
        values: list[float],
        weak: set[str],
        adjacent_jump: bool,
        out: list[Finding],
    ) -> None:
        c = self.config
        live = [(name, v) for name, v in zip(layers, values) if name not in weak]
        std = mean = ratio = 0.0
        if len(live) >= 3:
            norms = np.asarray([v for _, v in live])
            mean, std = float(norms.mean()), float(norms.std())
            ratio = std / mean
        # an adjacent jump is layer_ratio's finding; dispersion reports spread it misses
        hit = ratio > c.dispersion_ratio and not adjacent_jump
        run = self._run(Kind.LAYER_DISPERSION)
        held = run.update(hit, step, ratio)
        if not self._fire(Kind.LAYER_DISPERSION, held >= c.tensor_sustain, c.rearm_snapshots):
            return
        ranked = sorted(live, key=lambda item: item[1])
        (low_name, low), (high_name, high) = ranked[0], ranked[-1]
        out.append(
            make_finding(
                c,
                Kind.LAYER_DISPERSION,
                (run.first, step),
                f"layer gradient norms dispersed: std {std:.3g} = {ratio:.1f}× the mean "
                f"{mean:.3g} over {len(live)} layers (limit {c.dispersion_ratio:g}×); "
                f"largest {high_name} {high:.3g}, smallest {low_name} {low:.3g}",
                {
                    "mean": mean,
                    "std": std,
                    "ratio": ratio,
                    "layers": len(live),
                    "largest_norm": high,
                    "smallest_norm": low,
                    "largest_share": high * high / float(np.sum(np.square([v for _, v in live]))),
                    "dispersion_ratio": c.dispersion_ratio,
                },
                (high_name, low_name),
            )
        )


def diagnose(
    columns: Mapping[str, Sequence[float]],
    steps: Sequence[int],
    names: Sequence[str] = (),
    tensor_steps: Sequence[int] = (),
    tensor_norms: Sequence[Sequence[float]] = (),
    config: HealthConfig | None = None,
    *,
    order: OrderLike | None = None,
    chunk: int = 1000,
) -> list[Finding]:
    """Run the health rules over a whole recorded run (steps in increasing order).

    ``columns`` maps step-column names (see ``STEP_COLUMNS``) to per-step values
    aligned with ``steps``; missing columns count as not recorded. Per-tensor snapshots
    ``tensor_norms[j]`` at ``tensor_steps[j]`` are aligned with ``names``. The run is fed
    to a :class:`HealthMonitor` in chunks of ``chunk`` steps, so the findings are those
    an online monitor would have emitted.
    """
    if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1:
        raise ValueError(f"chunk must be an int >= 1, got {chunk!r}")
    step_list = [int(s) for s in steps]
    data = {
        key: np.asarray(values, dtype=np.float64).reshape(-1).tolist()
        for key, values in columns.items()
    }
    for key, values in data.items():
        if len(values) != len(step_list):
            raise ValueError(
                f"columns[{key!r}] has {len(values)} values for {len(step_list)} steps"
            )
    if len(tensor_steps) != len(tensor_norms):
        raise ValueError(
            f"tensor_steps has {len(tensor_steps)} entries but tensor_norms has {len(tensor_norms)}"
        )
    snapshots = sorted(
        zip(
            (int(s) for s in tensor_steps),
            (np.asarray(row, dtype=np.float64).tolist() for row in tensor_norms),
        ),
        key=lambda item: item[0],
    )
    monitor = HealthMonitor(config, order=order)
    found: list[Finding] = []
    fed = 0
    for start in range(0, max(len(step_list), 1), chunk):
        part = step_list[start : start + chunk]
        last = part[-1] if part else math.inf
        is_last = start + chunk >= len(step_list)
        take = fed
        while take < len(snapshots) and (is_last or snapshots[take][0] <= last):
            take += 1
        batch = HostBatch(
            steps=part,
            columns={key: values[start : start + chunk] for key, values in data.items()},
            names=tuple(names),
            tensor_steps=[s for s, _ in snapshots[fed:take]],
            tensor_norms=[row for _, row in snapshots[fed:take]],
        )
        fed = take
        found.extend(monitor.update(batch))
    return found
