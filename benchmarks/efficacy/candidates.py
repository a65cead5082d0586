"""Candidate rows for the self-tuning research (``--candidates``).

The candidate is :class:`gradguard.policies.feedback.FeedbackClip` (after
``SkipNonFinite``); a row ``"fb:knob=value;knob=value"`` builds it with other settings
(see :class:`~gradguard.policies.feedback.FeedbackConfig`). The loop gives it the step's
loss and LR through ``observe``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import fields

import gradguard as gg
from gradguard.policies.feedback import FeedbackClip, FeedbackConfig

PolicyFactory = Callable[[], gg.Policy]
#: Row name of the self-tuning candidate at its defaults.
FEEDBACK = "FeedbackClip"


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


def rows() -> dict[str, PolicyFactory]:
    """Candidate rows for the runner."""
    return {FEEDBACK: parse("fb:")}
