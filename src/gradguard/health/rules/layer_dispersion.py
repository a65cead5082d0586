"""``layer_dispersion``: a few layers carry almost all the gradient."""

from __future__ import annotations

import numpy as np

from .. import _check as check
from ..advice import RESIDUAL_NORM
from ..base import LayerRule, Threshold
from ..findings import Severity, layer_label
from ..signals import LayerSnapshot

_ALL = ("all",)  # the one streak: the snapshot as a whole


class LayerDispersion(LayerRule):
    kind = "layer_dispersion"
    severity = Severity.WARNING
    condition = (
        "std of the layer norms > dispersion_ratio × their mean for `tensor_sustain` "
        "snapshots, over the layers that are neither dead nor vanishing (at least 3), while "
        "no adjacent pair exceeds layer_ratio (that rule already reports such a jump). "
        "Population std of n positive norms is at most sqrt(n - 1) × the mean, so the seed's "
        "5× needs >= 27 layers; the default 3× needs >= 11 and still means one layer or a "
        "few carry most of the gradient (e.g. one layer 100× the others among 20)"
    )
    advice = (
        RESIDUAL_NORM,
        "Rescale the dominant layers: careful init (He/Xavier; scale residual-branch "
        "outputs by 1/sqrt(depth)), or per-layer learning rates (a parameter group "
        "with a lower lr for the largest layers).",
        "Clip per layer rather than globally: gradguard.AGC (adaptive_clip_grad_, "
        "clipping=0.01–0.1) bounds each layer's gradient relative to its weights, so one "
        "layer no longer sets the global clip coefficient.",
        "Check the dominant layer for an unnormalised input or a loss term that only "
        "reaches it (e.g. an auxiliary loss with a large weight).",
    )
    thresholds = (
        Threshold(
            "dispersion_ratio",
            3.0,
            check.positive,
            "the layer norms of one snapshot are too dispersed when their std exceeds this "
            "many times their mean (seed 003 uses 5, reachable only from 27 layers; 3 from 11)",
        ),
    )

    def on_snapshot(self, snapshot: LayerSnapshot) -> None:
        c = self.config
        keep = ~snapshot.weak
        norms = snapshot.values[keep]
        std = mean = ratio = 0.0
        if len(norms) >= 3:
            mean, std = float(norms.mean()), float(norms.std())
            ratio = std / mean
        hit = ratio > c.dispersion_ratio and not snapshot.adjacent_jump(c.layer_ratio)
        held = self.held(snapshot.step, _ALL, np.array([hit]))
        active, first = bool(held), held.get("all", snapshot.step)
        for change in self.observe(snapshot.step, active, first):
            values = snapshot.values.tolist()
            live = [(n, v) for n, v, k in zip(snapshot.layers, values, keep) if k]
            ranked = sorted(live, key=lambda item: item[1])
            (low_name, low), (high_name, high) = ranked[0], ranked[-1]
            squares = float(np.sum(np.square([v for _, v in live])))
            s = change.episode.stats
            s["message"] = (
                f"layer gradient norms dispersed: std {std:.3g} = {ratio:.1f}× the mean "
                f"{mean:.3g} over {len(live)} layers (limit {c.dispersion_ratio:g}×); "
                f"largest {layer_label(high_name)} {high:.3g}, "
                f"smallest {layer_label(low_name)} {low:.3g}"
            )
            s["evidence"] = {
                "mean": mean,
                "std": std,
                "ratio": ratio,
                "layers": len(live),
                "largest_norm": high,
                "smallest_norm": low,
                "largest_share": high * high / squares,
                "dispersion_ratio": c.dispersion_ratio,
            }
            s["params"] = (high_name, low_name)
            self.report(change.episode, s["message"], s["evidence"], s["params"])
