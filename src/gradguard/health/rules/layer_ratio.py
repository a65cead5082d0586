"""``layer_ratio``: adjacent layers whose gradient norms differ by orders of magnitude."""

from __future__ import annotations

from .. import _check as check
from ..advice import INIT, RESIDUAL_NORM
from ..base import Rule, Threshold
from ..findings import Severity
from ..signals import LayerSnapshot


class LayerRatio(Rule):
    kind = "layer_ratio"
    severity = Severity.WARNING
    scope = "layer"
    condition = (
        "adjacent layers' norms differ by more than layer_ratio for `tensor_sustain` snapshots"
    )
    advice = (
        RESIDUAL_NORM,
        INIT,
        "Consider per-tensor clipping or AGC so one layer does not dominate the global norm.",
    )
    thresholds = (
        Threshold(
            "layer_ratio",
            100.0,
            check.greater_than_one,
            "adjacent-layer norm ratio above which the layer view is unbalanced (seed 003)",
        ),
    )

    def on_snapshot(self, snapshot: LayerSnapshot) -> None:
        c = self.config
        found: list[tuple[str, str, float, int]] = []
        for a, b, ratio in snapshot.ratios:
            run = self.run((a, b))
            held = run.update(ratio > c.layer_ratio, snapshot.step, ratio)
            if self.fire((a, b), held >= c.tensor_sustain, c.rearm_snapshots):
                found.append((a, b, ratio, run.first))
        if not found:
            return
        a, b, ratio, _ = max(found, key=lambda item: item[2])
        self.report(
            (min(first for *_, first in found), snapshot.step),
            f"adjacent layers differ by up to {ratio:.0f}× ({a} vs {b}); limit {c.layer_ratio:g}×",
            {"max_ratio": ratio, "pairs": len(found), "layer_ratio": c.layer_ratio},
            tuple(dict.fromkeys(name for a, b, *_ in found for name in (a, b))),
        )
