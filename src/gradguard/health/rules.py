"""The rule table: what each finding kind means, how bad it is and what to do about it.

Detection lives in :mod:`.monitor`; everything a user reads (severity, condition,
advice) lives here as data. Advice strings may use ``{clip_low}``, ``{clip_high}``
and ``{family}``, filled from the configured family.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from .config import HealthConfig
from .findings import Finding, Kind, Severity


@dataclass(frozen=True)
class RuleSpec:
    """One health rule as data.

    Attributes:
        kind: the finding kind it emits.
        severity: severity of its findings.
        scope: ``"step"`` (per-step columns), ``"window"`` (a rolling window of steps) or
            ``"layer"`` (per-tensor snapshots).
        condition: the trigger, in words, naming the ``HealthConfig`` fields it reads.
        advice: concrete actions, most useful first.
    """

    kind: Kind
    severity: Severity
    scope: str
    condition: str
    advice: tuple[str, ...]


_LOWER_LR = "Lower the learning rate (try halving it) or lengthen warmup."
_CLIP = "Enable global-norm clipping; a {family} model usually starts at {clip_low}–{clip_high}."
_ACTIVATIONS = "Use ReLU-family activations (ReLU, LeakyReLU, GELU) instead of sigmoid/tanh."
_RESIDUAL_NORM = "Add residual connections and normalisation layers (LayerNorm/BatchNorm)."
_INIT = "Use He initialisation for ReLU layers, Xavier/Glorot for tanh/sigmoid layers."

RULES: tuple[RuleSpec, ...] = (
    RuleSpec(
        Kind.NONFINITE,
        Severity.CRITICAL,
        "step",
        "total_norm is NaN/inf, or a step was skipped for a non-finite gradient "
        "(AMP overflow skips excluded); origin = first non-finite parameter in backward order",
        (
            "Check the input batch and labels for NaN/inf (torch.isfinite(x).all()).",
            "Inspect the origin's forward: log/sqrt/division of values that reach 0 or below, "
            "or torch.where with an invalid branch (its gradient is 0 × NaN = NaN).",
            "Skip non-finite steps so weights and optimiser state stay clean.",
            _LOWER_LR,
            "Run find_nonfinite_forward(model, batch) to name the first module whose "
            "output is non-finite.",
        ),
    ),
    RuleSpec(
        Kind.EXPLODING,
        Severity.WARNING,
        "step",
        "total_norm > explode_above for `sustain` steps, or >= jump_factor × the rolling "
        "median for `jump_sustain` steps (an order-of-magnitude jump)",
        (
            _CLIP,
            _LOWER_LR,
            "Check the data for outliers and the loss for a wrong scale (sum instead of mean).",
            _RESIDUAL_NORM,
            "For RNNs: shorter truncated-BPTT windows, LSTM/GRU, or orthogonal recurrent init.",
        ),
    ),
    RuleSpec(
        Kind.SPIKE,
        Severity.INFO,
        "step",
        "total_norm >= jump_factor × the rolling median for fewer than `jump_sustain` steps",
        (
            "Inspect the batches at these steps for corrupt or outlier samples.",
            _CLIP + " Or skip outlier steps with a spike policy.",
        ),
    ),
    RuleSpec(
        Kind.VANISHING,
        Severity.WARNING,
        "step",
        "total_norm < vanish_total for `sustain` steps",
        (
            _ACTIVATIONS,
            _RESIDUAL_NORM,
            _INIT,
            "Check the loss is connected to the parameters (no detach, no zero loss scale).",
        ),
    ),
    RuleSpec(
        Kind.VANISHING_LAYER,
        Severity.WARNING,
        "layer",
        "a layer's norm is < vanish_layer, or < vanish_layer_relative × the largest layer "
        "norm, for `tensor_sustain` snapshots",
        (_ACTIVATIONS, _RESIDUAL_NORM, _INIT),
    ),
    RuleSpec(
        Kind.DEAD_LAYER,
        Severity.WARNING,
        "layer",
        "a layer's gradient norm is exactly 0 for `tensor_sustain` snapshots",
        (
            "Check the layer is used in forward and its output is not detached or zeroed.",
            "Dead ReLUs: use LeakyReLU/GELU, a lower learning rate and He initialisation.",
            "A bias followed by BatchNorm always gets a zero gradient: use bias=False.",
            "If the layer is frozen on purpose, set requires_grad=False.",
        ),
    ),
    RuleSpec(
        Kind.LAYER_RATIO,
        Severity.WARNING,
        "layer",
        "adjacent layers' norms differ by more than layer_ratio for `tensor_sustain` snapshots",
        (
            _RESIDUAL_NORM,
            _INIT,
            "Consider per-tensor clipping or AGC so one layer does not dominate the global norm.",
        ),
    ),
    RuleSpec(
        Kind.LAYER_DISPERSION,
        Severity.WARNING,
        "layer",
        "std of the layer norms > dispersion_ratio × their mean for `tensor_sustain` "
        "snapshots, over the layers that are neither dead nor vanishing (at least 3), while "
        "no adjacent pair exceeds layer_ratio (that rule already reports such a jump). "
        "Population std of n positive norms is at most sqrt(n - 1) × the mean, so the seed's "
        "5× needs >= 27 layers; the default 3× needs >= 11 and still means one layer or a "
        "few carry most of the gradient (e.g. one layer 100× the others among 20)",
        (
            _RESIDUAL_NORM,
            "Rescale the dominant layers: careful init (He/Xavier; scale residual-branch "
            "outputs by 1/sqrt(depth)), or per-layer learning rates (a parameter group "
            "with a lower lr for the largest layers).",
            "Clip per layer rather than globally: gradguard.AGC (adaptive_clip_grad_, "
            "clipping=0.01–0.1) bounds each layer's gradient relative to its weights, so one "
            "layer no longer sets the global clip coefficient.",
            "Check the dominant layer for an unnormalised input or a loss term that only "
            "reaches it (e.g. an auxiliary loss with a large weight).",
        ),
    ),
    RuleSpec(
        Kind.CLIP_INACTIVE,
        Severity.INFO,
        "window",
        "over `clip_window` steps, >= clip_idle_share of them are below "
        "clip_idle_below × threshold",
        (
            "Lower the threshold toward evidence['recommended_threshold'] "
            "(recommend_threshold() on recent unclipped norms).",
            "Or keep it as a deliberate safety net that only catches rare spikes.",
        ),
    ),
    RuleSpec(
        Kind.CLIP_SATURATED,
        Severity.WARNING,
        "window",
        "over `clip_window` steps, >= clip_saturated_share of them are clipped, with norms "
        "well above the threshold (not hovering)",
        (
            _LOWER_LR + " Clipping every step turns the optimiser into normalised SGD.",
            "Check the architecture (normalisation, residuals) and the data/loss scale.",
            "If the norms are steady and typical of a {family} model, raise the threshold "
            "(recommend_threshold()).",
        ),
    ),
    RuleSpec(
        Kind.CLIP_HOVERING,
        Severity.WARNING,
        "window",
        "over `clip_window` steps, >= hover_share of the norms lie within hover_band × threshold",
        (
            "The learning rate is likely too high: lower it or add decay.",
            "Add or lengthen warmup.",
        ),
    ),
    RuleSpec(
        Kind.LOSS_STALL,
        Severity.WARNING,
        "window",
        "over `stall_window` steps the loss improves by < stall_tolerance (second half vs "
        "first) while most norms exceed the healthy range",
        (
            "Lower the learning rate: large gradients with a flat loss mean the optimiser "
            "bounces across a valley.",
            "Add learning-rate decay.",
            "Check the labels and data for noise or a target the model cannot fit.",
        ),
    ),
    RuleSpec(
        Kind.AMP_OVERFLOW,
        Severity.WARNING,
        "window",
        "after the first amp_warmup steps, more than amp_overflow_rate of the last "
        "amp_window steps were skipped by the GradScaler for inf/NaN (reason amp_overflow); "
        "its early calibration overflows are normal and not counted",
        (
            "The loss scale keeps backing off: if the hardware supports it (Ampere or newer, "
            "TPU), autocast to bfloat16, which has fp32's range and needs no GradScaler.",
            "Find the layers that produce inf in fp16: overflowing activations or attention "
            "logits (scale queries by 1/sqrt(d), keep softmax/norm layers in fp32, clamp "
            "logits); run find_nonfinite_forward(model, batch) under autocast.",
            _LOWER_LR,
            "Check the GradScaler settings: a short growth_interval (default 2000) or a large "
            "growth_factor (default 2.0) makes the scale overshoot and overflow again.",
        ),
    ),
)

SPECS: Mapping[Kind, RuleSpec] = {rule.kind: rule for rule in RULES}


def make_finding(
    config: HealthConfig,
    kind: Kind,
    steps: tuple[int, int],
    message: str,
    evidence: Mapping[str, float],
    params: tuple[str, ...] = (),
    extra_advice: tuple[str, ...] = (),
) -> Finding:
    """Build a finding of ``kind`` with the table's severity and formatted advice."""
    spec = SPECS[kind]
    row = config.family_row
    fill = {
        "family": row.name,
        "clip_low": f"{row.clip_range[0]:g}",
        "clip_high": f"{row.clip_range[1]:g}",
    }
    advice = tuple(text.format(**fill) for text in spec.advice) + extra_advice
    return Finding(
        kind=kind,
        severity=spec.severity,
        steps=(int(steps[0]), int(steps[1])),
        params=params,
        evidence={k: float(v) for k, v in evidence.items()},
        advice=advice,
        message=message,
    )
