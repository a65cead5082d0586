"""``nonfinite``: a NaN or inf gradient, with where it started."""

from __future__ import annotations

import math
from collections.abc import Sequence

from ...schema import SkipReason
from ..advice import LOWER_LR
from ..base import Rule, StepRow
from ..findings import Severity


class NonFinite(Rule):
    kind = "nonfinite"
    severity = Severity.CRITICAL
    scope = "step"
    reads = "nonamp"
    condition = (
        "total_norm is NaN/inf, or a step was skipped for a non-finite gradient "
        "(AMP overflow skips excluded); origin = first non-finite parameter in backward order"
    )
    advice = (
        "Check the input batch and labels for NaN/inf (torch.isfinite(x).all()).",
        "Inspect the origin's forward: log/sqrt/division of values that reach 0 or below, "
        "or torch.where with an invalid branch (its gradient is 0 × NaN = NaN).",
        "Skip non-finite steps so weights and optimiser state stay clean.",
        LOWER_LR,
        "Run find_nonfinite_forward(model, batch) to name the first module whose "
        "output is non-finite.",
    )

    def on_step(self, row: StepRow) -> None:
        bad = not row.finite or (row.skipped and row.reason == SkipReason.NONFINITE)
        if self.fire(self.kind, bad, self.config.rearm_steps):
            self._found_at(row.step, row.norm, row.tensor_norms, row.names)

    def _found_at(
        self, step: int, norm: float, snapshot: Sequence[float] | None, names: tuple[str, ...]
    ) -> None:
        evidence: dict[str, float] = {"total_norm": norm}
        params: tuple[str, ...] = ()
        extra: tuple[str, ...] = ()
        origin = None
        if snapshot is not None and names and len(snapshot) == len(names):
            bad = [name for name, v in zip(names, snapshot) if not math.isfinite(float(v))]
            evidence.update(nonfinite_tensors=len(bad), tensors=len(names))
            if bad:
                order = self.context.order
                if order is not None:
                    origin = order.first_nonfinite(bad)
                exact = origin is not None
                if origin is None:
                    origin = bad[-1]  # reverse registration order approximates backward
                evidence["origin_exact"] = float(exact)
                params = (origin, *(name for name in bad if name != origin))
        else:
            extra = ("Record per-tensor norms at non-finite steps to locate the origin.",)
        where = f"; origin {origin}" if origin else ""
        message = f"non-finite gradient at step {step}{where}"
        self.report((step, step), message, evidence, params, extra)
