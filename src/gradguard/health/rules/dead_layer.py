"""``dead_layer``: layers whose gradient is exactly zero, or that get none at all."""

from __future__ import annotations

from ..base import LayerRule
from ..findings import Severity, layer_label
from ..signals import LayerSnapshot

_MAX_PARAMS = 64


class DeadLayer(LayerRule):
    kind = "dead_layer"
    severity = Severity.WARNING
    condition = (
        "a layer's gradient norm is exactly 0 for `tensor_sustain` snapshots in a row, or "
        "its parameters require grad but got no gradient in the backward pass the backward "
        "order observed (detached, run under no_grad, or unused)"
    )
    advice = (
        "Check the layer is used in forward and its output is not detached or zeroed "
        "(.detach(), .data, torch.no_grad(), a round trip through numpy).",
        "Dead ReLUs: use LeakyReLU/GELU, a lower learning rate and He initialisation.",
        "A bias followed by BatchNorm always gets a zero gradient: use bias=False.",
        "If the layer is frozen on purpose, set requires_grad=False.",
    )

    def on_snapshot(self, snapshot: LayerSnapshot) -> None:
        held = self.held(snapshot.step, snapshot.layers, snapshot.dead)
        unreached = snapshot.unreached
        active = bool(held or unreached)
        start = min(held.values(), default=snapshot.step)
        if unreached:
            start = self.context.first_step
        for change in self.observe(snapshot.step, active, start):
            episode = change.episode
            s = episode.stats
            zero = s.setdefault("zero", {})
            position = {name: i for i, name in enumerate(snapshot.layers)}
            for name in held:
                if name in unreached:
                    continue  # no gradient at all: reported as such below
                if len(zero) < _MAX_PARAMS:
                    zero[name] = position.get(name, -1)
            if unreached:
                s["unreached"] = tuple(unreached[:_MAX_PARAMS])
            parts = []
            if s.get("unreached"):
                names = s["unreached"]
                parts.append(
                    f"{len(names)} layer(s) require grad but get no gradient at all, e.g. "
                    f"{layer_label(names[0])} (detached or unused in forward)"
                )
            # the gradient stops at the deepest zero layer; the layers before it get none
            deepest = sorted(zero, key=zero.__getitem__, reverse=True)
            if zero:
                before = len(zero) - 1
                parts.append(
                    f"gradient stops at {layer_label(deepest[0])}: exactly zero there"
                    + (f" and in the {before} layer(s) before it" if before else "")
                )
            params = tuple(dict.fromkeys((*s.get("unreached", ()), *deepest)))
            self.report(
                episode,
                "; ".join(parts),
                {
                    "layers": len(params),
                    "unreached_layers": len(s.get("unreached", ())),
                    "largest_layer_norm": snapshot.largest,
                },
                params,
                origin=params[0] if params else None,
            )
