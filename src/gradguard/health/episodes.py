"""Findings as episodes: opened when a condition starts, extended while it lasts, closed
when it has stayed clear for a while.

An :class:`Episode` carries its true range (first and last step the condition held)
and a stable key, so each update replaces the previous one in the run store. A
:class:`Tracker` drives the episodes of one condition over batches of observations; its
state is a few counters, whatever the length of the run.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class Episode:
    """One occurrence of a condition.

    Attributes:
        kind: the finding kind.
        first: the first step the condition held (or the start of its evidence window).
        last: the last step it held so far.
        open: whether it may still be extended.
        scope: distinguishes concurrent episodes of one kind (e.g. a layer).
        stats: numbers the rule accumulates over the episode.
        reported: whether it was reported before (warnings go out on the first report).
    """

    kind: str
    first: int
    last: int
    open: bool = True
    scope: str = ""
    stats: dict[str, Any] = field(default_factory=dict)
    reported: bool = False

    @property
    def key(self) -> str:
        """Identifies the episode within a run: ``kind@first`` (``kind:scope@first``)."""
        where = f":{self.scope}" if self.scope else ""
        return f"{self.kind}{where}@{self.first}"


@dataclass
class Change:
    """What one batch did to an episode: ``rows[lo:hi + 1]`` of the batch belong to it."""

    episode: Episode
    lo: int
    hi: int


class Tracker:
    """Open, extend and close the episodes of one condition.

    An episode opens once the condition has held ``sustain`` consecutive observations,
    starting at the first of them (or at ``starts[i]`` of the observation that opened
    it); it is extended to every later observation where the condition holds, and
    closes after ``close_after`` consecutive clear observations.
    """

    __slots__ = ("clear", "close_after", "episode", "kind", "run", "run_first", "scope", "sustain")

    def __init__(self, kind: str, sustain: int = 1, close_after: int = 100, scope: str = ""):
        self.kind = kind
        self.sustain = max(1, int(sustain))
        self.close_after = max(1, int(close_after))
        self.scope = scope
        self.run = 0  # consecutive observations the condition has held
        self.run_first = 0
        self.clear = 0  # consecutive clear observations while an episode is open
        self.episode: Episode | None = None

    @property
    def is_open(self) -> bool:
        return self.episode is not None

    def feed(
        self,
        steps: np.ndarray,
        active: np.ndarray,
        starts: np.ndarray | None = None,
        *,
        stop: bool = False,
    ) -> tuple[list[Change], int]:
        """Observe ``active`` at ``steps``; return the changed episodes and the number of
        observations consumed (fewer than given when ``stop`` and an episode opened or
        closed: the caller recomputes the condition for the rest)."""
        n = len(steps)
        changes: dict[int, Change] = {}
        if n == 0:
            return [], 0
        active = np.asarray(active, dtype=bool)
        if self.episode is None and not active.any():
            self.run = 0  # nothing held: no episode to open, extend or close
            return [], n
        edges = np.flatnonzero(active[1:] != active[:-1]) + 1
        bounds = [0, *edges.tolist(), n]
        for a, b in itertools.pairwise(bounds):
            if active[a]:
                if self.run == 0:
                    self.run_first = int(steps[a])
                before, self.run = self.run, self.run + (b - a)
                self.clear = 0
                if self.episode is None:
                    if self.run < self.sustain:
                        continue
                    i = a + max(0, self.sustain - before - 1)
                    first = int(starts[i]) if starts is not None else self.run_first
                    self.episode = Episode(self.kind, first, int(steps[i]), scope=self.scope)
                    changes[id(self.episode)] = Change(self.episode, i, i)
                    if stop:
                        return list(changes.values()), i + 1
                    a = i
                change = changes.get(id(self.episode))
                if change is None:
                    change = changes[id(self.episode)] = Change(self.episode, a, a)
                change.hi = b - 1
                self.episode.last = int(steps[b - 1])
            else:
                self.run = 0
                if self.episode is None:
                    continue
                self.clear += b - a
                if self.clear >= self.close_after:
                    closed, self.episode = self.episode, None
                    closed.open = False
                    change = changes.setdefault(id(closed), Change(closed, a, a - 1))
                    if stop:
                        end = b - (self.clear - self.close_after)
                        self.clear = 0
                        return list(changes.values()), end
                    self.clear = 0
        return list(changes.values()), n
