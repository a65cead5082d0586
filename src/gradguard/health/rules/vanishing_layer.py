"""``vanishing_layer``: a layer whose gradient is vanishingly small."""

from __future__ import annotations

from .. import _check as check
from ..advice import ACTIVATIONS, INIT, RESIDUAL_NORM
from ..base import Rule, Threshold
from ..findings import Severity
from ..signals import LayerSnapshot


class VanishingLayer(Rule):
    kind = "vanishing_layer"
    severity = Severity.WARNING
    scope = "layer"
    condition = (
        "a layer's norm is < vanish_layer, or < vanish_layer_relative × the largest layer "
        "norm, for `tensor_sustain` snapshots"
    )
    advice = (ACTIVATIONS, RESIDUAL_NORM, INIT)
    thresholds = (
        Threshold(
            "vanish_layer",
            1e-8,
            check.positive,
            "layer norm below which a layer's gradient vanishes (seed 003: 1e-8)",
        ),
        Threshold(
            "vanish_layer_relative",
            1e-5,
            check.fraction,
            "a layer also vanishes below this fraction of the largest layer norm in the same "
            "snapshot (catches deep sigmoid stacks whose output layer still gets large gradients)",
        ),
    )

    def on_snapshot(self, snapshot: LayerSnapshot) -> None:
        c = self.config
        low: list[tuple[str, float, int]] = []
        for name, hit, value in zip(snapshot.layers, snapshot.low, snapshot.values):
            run = self.run(name)
            held = run.update(hit, snapshot.step, value)
            if self.fire(name, held >= c.tensor_sustain, c.rearm_snapshots):
                low.append((name, value, run.first))
        if not low:
            return
        largest = snapshot.largest
        name, value, _ = min(low, key=lambda item: item[1])
        self.report(
            (min(first for *_, first in low), snapshot.step),
            f"{len(low)} layer(s) with vanishing gradients; smallest {name}: "
            f"{value:.2e} ({value / largest:.1e} of the largest layer norm {largest:.3g})",
            {
                "layers": len(low),
                "min_norm": value,
                "largest_layer_norm": largest,
                "min_share": value / largest,
            },
            tuple(name for name, *_ in low),
        )
