"""``layer_ratio``: adjacent layers whose gradient norms differ by orders of magnitude."""

from __future__ import annotations

from .. import _check as check
from ..advice import INIT, RESIDUAL_NORM
from ..base import LayerRule, Threshold
from ..findings import Severity, layer_label
from ..signals import LayerSnapshot


class LayerRatio(LayerRule):
    kind = "layer_ratio"
    severity = Severity.WARNING
    condition = (
        "adjacent layers' norms differ by more than layer_ratio for `tensor_sustain` "
        "snapshots in a row (dead or vanishing layers are left to their own rules)"
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
        held = self.held(snapshot.step, snapshot.pairs, snapshot.ratios > c.layer_ratio)
        start = min(held.values(), default=snapshot.step)
        for change in self.observe(snapshot.step, bool(held), start):
            episode = change.episode
            ratios = dict(zip(snapshot.pairs, snapshot.ratios.tolist()))
            s = episode.stats
            pairs = s.setdefault("pairs", {})
            for pair in held:
                pairs[pair] = max(pairs.get(pair, 0.0), ratios[pair])
            (a, b), worst = max(pairs.items(), key=lambda item: item[1])
            self.report(
                episode,
                f"adjacent layers differ by up to {worst:.0f}× "
                f"({layer_label(a)} vs {layer_label(b)}); "
                f"limit {c.layer_ratio:g}×",
                {"max_ratio": worst, "pairs": len(pairs), "layer_ratio": c.layer_ratio},
                tuple(dict.fromkeys(name for pair in pairs for name in pair)),
            )
