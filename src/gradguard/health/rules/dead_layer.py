"""``dead_layer``: a layer whose gradient is exactly zero."""

from __future__ import annotations

from ..base import Rule
from ..findings import Severity
from ..signals import LayerSnapshot


class DeadLayer(Rule):
    kind = "dead_layer"
    severity = Severity.WARNING
    scope = "layer"
    condition = "a layer's gradient norm is exactly 0 for `tensor_sustain` snapshots"
    advice = (
        "Check the layer is used in forward and its output is not detached or zeroed.",
        "Dead ReLUs: use LeakyReLU/GELU, a lower learning rate and He initialisation.",
        "A bias followed by BatchNorm always gets a zero gradient: use bias=False.",
        "If the layer is frozen on purpose, set requires_grad=False.",
    )

    def on_snapshot(self, snapshot: LayerSnapshot) -> None:
        c = self.config
        dead: list[tuple[str, int]] = []
        for name, hit, value in zip(snapshot.layers, snapshot.dead, snapshot.values):
            run = self.run(name)
            held = run.update(hit, snapshot.step, value)
            if self.fire(name, held >= c.tensor_sustain, c.rearm_snapshots):
                dead.append((name, run.first))
        if dead:
            self.report(
                (min(first for _, first in dead), snapshot.step),
                f"{len(dead)} layer(s) get exactly zero gradient, e.g. {dead[0][0]}",
                {"layers": len(dead), "largest_layer_norm": snapshot.largest},
                tuple(name for name, _ in dead),
            )
