"""``vanishing_layer``: layers whose gradient is vanishingly small."""

from __future__ import annotations

import math

import numpy as np

from .. import _check as check
from ..advice import ACTIVATIONS, INIT, RESIDUAL_NORM
from ..base import Context, LayerRule, Threshold
from ..findings import Severity, layer_label
from ..signals import LayerSnapshot, LossTrend


class VanishingLayer(LayerRule):
    kind = "vanishing_layer"
    severity = Severity.WARNING
    condition = (
        "a layer's norm is < vanish_layer, or < vanish_layer_relative × the largest layer "
        "norm, for `tensor_sustain` snapshots in a row, unless the loss is down to "
        "`fitted_loss` × its initial level (the model fits its data)"
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

    def __init__(self, context: Context) -> None:
        super().__init__(context)
        self.loss = context.signal(LossTrend)

    def on_snapshot(self, snapshot: LayerSnapshot) -> None:
        low = np.zeros_like(snapshot.low) if self.loss.fitted_now() else snapshot.low
        held = self.held(snapshot.step, snapshot.layers, low)
        start = min(held.values(), default=snapshot.step)
        for change in self.observe(snapshot.step, bool(held), start):
            episode = change.episode
            s = episode.stats
            layers = s.setdefault("layers", {})
            values = dict(zip(snapshot.layers, snapshot.values.tolist()))
            for name in held:
                layers[name] = True
            if held:
                name = min(held, key=values.__getitem__)
                value = values[name]
                if value < s.get("min", math.inf):
                    s.update(min=value, min_name=name, largest=snapshot.largest)
            self.report(
                episode,
                f"{len(layers)} layer(s) with vanishing gradients; "
                f"smallest {layer_label(s['min_name'])}: "
                f"{s['min']:.2e} ({s['min'] / s['largest']:.1e} of the largest layer norm "
                f"{s['largest']:.3g})",
                {
                    "layers": len(layers),
                    "min_norm": s["min"],
                    "largest_layer_norm": s["largest"],
                    "min_share": s["min"] / s["largest"],
                },
                tuple(layers),
                origin=s["min_name"],
            )
