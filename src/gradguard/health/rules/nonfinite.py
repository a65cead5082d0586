"""``nonfinite``: NaN or inf gradients, as an episode, with where they started."""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any

import numpy as np

from ...schema import EventKind, SkipReason
from ..advice import LOWER_LR
from ..base import Context, Rule, Steps
from ..episodes import Episode, Tracker
from ..findings import BACKWARD, FORWARD, Severity
from ..signals import NormBaseline

_LATE_LIMIT = 256  # skip events kept for steps not yet seen
#: a finite norm this many times the run's first, on the step before a non-finite one,
#: makes the explosion the likely source of a non-finite forward pass
_EXPLODED = 1e3


class NonFinite(Rule):
    kind = "nonfinite"
    severity = Severity.CRITICAL
    scope = "step"
    condition = (
        "a step's total_norm is NaN/inf, or it was skipped for a non-finite gradient (AMP "
        "overflow skips excluded); the episode lasts until `rearm_steps` finite steps in a row. "
        "Origin: the forward pass, the loss or the input batch when the loss was non-finite or "
        "every gradient was; otherwise (a NaN born in backward) the first non-finite parameter "
        "in backward order, from a per-tensor snapshot or the skip event of that step. A "
        "forward origin right after a finite norm >= 1000x the run's first is told as the "
        "explosion's doing, not the data's. An infinite loss (not NaN: a step recorded "
        "without its loss reads NaN) with finite gradients, outside AMP overflows, is a "
        "warning of its own: the updates went through on a broken objective"
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

    def __init__(self, context: Context) -> None:
        super().__init__(context)
        self.tracker = Tracker(self.kind, 1, self.config.rearm_steps)
        self._late: OrderedDict[int, tuple[list[str], str | None]] = OrderedDict()
        self._names: tuple[str, ...] = ()
        self.baseline = context.signal(NormBaseline)  # (the run's first norm)
        self._last_finite: float = math.nan  # the last finite norm of earlier batches

    def on_events(self, events: list[Any]) -> None:
        for event in events:
            data = event.data if isinstance(event.data, dict) else {}
            if event.kind != EventKind.SKIP or data.get("reason") != SkipReason.NONFINITE.label:
                continue
            names = [str(n) for n in data.get("nonfinite") or ()]
            if names:
                origin = data.get("origin")
                self._late[int(event.step)] = (names, origin if isinstance(origin, str) else None)
                while len(self._late) > _LATE_LIMIT:
                    self._late.popitem(last=False)
        episode = self.tracker.episode
        if episode is not None and self._use_late(episode, episode.first, episode.last):
            self._report(episode)

    def on_steps(self, steps: Steps) -> None:
        if steps.names:
            self._names = steps.names
        finite = steps.finite
        grads = ~finite | (steps.skipped & (steps.reason == int(SkipReason.NONFINITE)))
        # an infinite loss whose gradients stayed finite (masked: relu, where, a clamp);
        # not NaN, which the store cannot tell from a step recorded without its loss,
        # and not an AMP overflow, the GradScaler's own business
        amp = steps.skipped & (steps.reason == int(SkipReason.AMP_OVERFLOW))
        loss_only = np.isinf(steps.loss) & ~grads & ~amp
        bad = grads | loss_only
        changes, _ = self.tracker.feed(steps.step, bad)
        for change in self.updated(changes):
            episode = change.episode
            span = np.arange(change.lo, change.hi + 1)
            rows = span[grads[span]]
            stats = episode.stats
            bad_rows = span[bad[span]]
            if "before" not in stats and len(bad_rows):  # the norm before it began
                earlier = np.flatnonzero(finite[: bad_rows[0]])
                stats["before"] = (
                    float(steps.norm[earlier[-1]]) if len(earlier) else self._last_finite
                )
            if len(rows):
                stats.setdefault("total_norm", float(steps.norm[rows[0]]))
            stats["count"] = stats.get("count", 0) + len(rows)
            stats["loss_only"] = stats.get("loss_only", 0) + int(loss_only[span].sum())
            if steps.loss_given:
                lost = ~np.isfinite(steps.loss[rows])
                stats["loss_seen"] = stats.get("loss_seen", 0) + len(rows)
                stats["loss_bad"] = stats.get("loss_bad", 0) + int(lost.sum())
            for row in rows:
                snapshot = steps.snapshots.get(int(steps.step[row]))
                if snapshot is not None and "located" not in stats:
                    bad_names = [n for n, v in zip(steps.names, snapshot) if not math.isfinite(v)]
                    self._locate(episode, bad_names, None)
            self._use_late(episode, episode.first, episode.last)
            self._report(episode)
        if finite.any():
            self._last_finite = float(steps.norm[np.flatnonzero(finite)[-1]])

    # ------------------------------------------------------------------ evidence

    def _explosion(self, stats: dict[str, Any]) -> tuple[str, float] | None:
        """``(clause, growth)`` when the step before the episode had a finite norm
        >= ``_EXPLODED`` x the run's first: then the explosion, not the data, most likely
        made the forward pass non-finite."""
        before, first = stats.get("before", math.nan), self.baseline.first()
        if not (math.isfinite(before) and first > 0 and before >= _EXPLODED * first):
            return None
        return (
            f", right after the gradient norm reached {before:.3g} ({before / first:.2g}× "
            f"the run's first, {first:.3g}): the exploding updates most likely carried the "
            "weights or activations past the float range, rather than the input batch",
            before / first,
        )

    def _report_loss(self, episode: Episode, steps: int) -> None:
        first, last = episode.first, episode.last
        where = f"at step {first}" if steps <= 1 and first == last else f"at {steps} steps"
        where += "" if first == last else f" ({first}–{last})"
        self.report(
            episode,
            f"infinite loss {where} while every gradient stayed finite: a log or a division "
            "reached zero (or the loss overflowed) on examples whose gradient is masked "
            "(relu, torch.where, a clamp), so the updates went through on a broken objective",
            {"loss_nonfinite_steps": float(steps), "nonfinite_steps": 0.0},
            origin=FORWARD,
            severity=Severity.WARNING,
            extra_advice=(
                "Find the examples whose loss is infinite (torch.isinf on the per-example "
                "loss); clamp the argument of log (x.clamp_min(eps)) or use a stable loss "
                "(log_softmax, BCEWithLogitsLoss).",
            ),
        )

    def _use_late(self, episode: Episode, first: int, last: int) -> bool:
        """Use a skip event's list of non-finite parameters for this episode, once."""
        if "located" in episode.stats:
            return False
        for step, (names, origin) in self._late.items():
            if first <= step <= last:
                self._locate(episode, names, origin)
                return True
        return False

    def _locate(self, episode: Episode, bad: list[str], origin: str | None) -> None:
        stats = episode.stats
        total = len(self._names) or len(bad)
        stats["located"] = True
        stats["nonfinite_tensors"] = len(bad)
        stats["tensors"] = total
        if not bad:
            return
        order = self.context.order
        exact = origin is not None
        if origin is None and order is not None:
            origin = order.first_nonfinite(bad)
            exact = origin is not None
        stats["param"] = origin if origin is not None else bad[-1]
        stats["exact"] = exact
        stats["bad"] = tuple(bad)
        stats["all_tensors"] = len(bad) >= total

    def _report(self, episode: Episode) -> None:
        stats = episode.stats
        count = stats.get("count", 0)
        first, last = episode.first, episode.last
        if count == 0:  # only the loss was infinite: the updates went through
            self._report_loss(episode, stats.get("loss_only", 0))
            return
        what = (
            f"non-finite gradient at step {first}"
            if count <= 1 and first == last
            else f"non-finite gradients at {count} steps ({first}–{last})"
        )
        evidence: dict[str, float] = {
            "total_norm": stats.get("total_norm", math.nan),
            "nonfinite_steps": count,
        }
        if "loss_seen" in stats:
            evidence["loss_nonfinite_steps"] = stats["loss_bad"]
        if "tensors" in stats:
            evidence["nonfinite_tensors"] = stats["nonfinite_tensors"]
            evidence["tensors"] = stats["tensors"]
            evidence["nonfinite_fraction"] = stats["nonfinite_tensors"] / max(stats["tensors"], 1)
        params: tuple[str, ...] = ()
        if "param" in stats:  # evidence: the first in backward order, then the others
            first = stats["param"]
            params = (first, *(n for n in stats["bad"] if n != first))
            evidence["origin_exact"] = float(stats["exact"])
        extra: tuple[str, ...] = ()
        exploded = self._explosion(stats)
        if exploded is not None:
            evidence["growth_before"] = exploded[1]
        if stats.get("loss_bad", 0) > 0:
            origin: str | None = FORWARD
            why = (
                "; the loss was non-finite too: the forward pass produced them, not a layer's "
                "backward" + exploded[0]
                if exploded is not None
                else "; the loss was non-finite too: the forward pass, the loss or the input "
                "batch produced them, not a layer's backward"
            )
            if "param" in stats:
                why += (
                    f" ({stats['nonfinite_tensors']} of {stats['tensors']} tensors non-finite; "
                    f"first in backward order {stats['param']})"
                )
        elif stats.get("all_tensors"):
            origin = FORWARD
            why = (
                f"; every gradient was non-finite ({stats['tensors']} tensors, the first in "
                f"backward order {stats['param']}): the loss or the forward pass produced "
                "them (a NaN born in one layer's backward spares the layers after it)"
            ) + (exploded[0] if exploded is not None else "")
        elif "param" in stats:
            origin = stats["param"]
            where = "first in backward order" if stats["exact"] else "last in model order"
            why = (
                f"; born in backward at {origin} ({where} of {stats['nonfinite_tensors']} "
                f"non-finite of {stats['tensors']} tensors; the loss was finite)"
                if "loss_seen" in stats
                else f"; origin {origin} ({where} of {stats['nonfinite_tensors']} non-finite "
                f"of {stats['tensors']} tensors)"
            )
        elif "loss_seen" in stats:
            origin = BACKWARD
            why = (
                "; the loss was finite, so the NaN was born in backward (no per-tensor norms "
                "at these steps to name the layer)"
            )
            extra = ("Record per-tensor norms at non-finite steps to locate the origin.",)
        else:
            origin = None
            why = ""
            extra = (
                "Pass the loss to guard.step(..., loss=loss) so a non-finite loss can be told "
                "from a NaN born in backward.",
            )
        if exploded is not None and origin == FORWARD:
            extra = (
                "The gradient exploded first (see the exploding finding): lower the learning "
                "rate, clip the gradient norm, or let the guard skip non-finite steps.",
                *extra,
            )
        self.report(episode, what + why, evidence, params, origin=origin, extra_advice=extra)
