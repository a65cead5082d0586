"""FeedbackClip with other settings, for the research: a row ``"fb:knob=value;..."``.

``python -m benchmarks.efficacy --rows "default,fb:spike=3;persist=2"`` compares
settings of :class:`~gradguard.policies.feedback.FeedbackConfig` (after
``SkipNonFinite``, as in the ``default`` row). The policy reads the step's loss
and LR from the guard.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import fields

import gradguard as gg
from gradguard.policies.feedback import FeedbackClip, FeedbackConfig

PolicyFactory = Callable[[], gg.Policy]


def parse(spec: str) -> PolicyFactory:
    """A factory from ``"fb:knob=value;knob=value"``: SkipNonFinite, then FeedbackClip."""
    types = {f.name: type(getattr(FeedbackConfig(), f.name)) for f in fields(FeedbackConfig)}
    settings: dict = {}
    for item in filter(None, spec.removeprefix("fb:").split(";")):
        key, value = item.split("=")
        if key not in types:
            raise ValueError(f"rows: FeedbackClip has no setting {key!r}; known: {list(types)}")
        kind = types[key]
        settings[key] = value.lower() in ("1", "true") if kind is bool else kind(value)
    FeedbackConfig(**settings)  # bad settings fail before anything runs
    return lambda: gg.chain(gg.SkipNonFinite(), FeedbackClip(**settings))
