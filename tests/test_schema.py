"""The recorded format: one skip-event producer for every path."""

from __future__ import annotations

from gradguard.schema import EventKind, SkipReason, skip_event


def test_skip_event_payload_and_message():
    event = skip_event(7, SkipReason.NONFINITE, ["a.weight", "b.bias"], "b.bias", [1])
    assert event.kind == EventKind.SKIP
    assert event.step == 7
    assert event.data == {
        "reason": "nonfinite",
        "nonfinite": ["a.weight", "b.bias"],
        "origin": "b.bias",
        "ranks": [1],
    }
    assert event.message == (
        "step 7 skipped (nonfinite); non-finite gradients from 'b.bias' (2 tensors); "
        "non-finite local gradients on rank(s) [1]"
    )


def test_skip_event_without_names():
    event = skip_event(3, "policy")
    assert event.data == {"reason": "policy", "nonfinite": [], "origin": None, "ranks": None}
    assert event.message == "step 3 skipped (policy)"


def test_finding_kinds():
    assert EventKind.finding("exploding") == "health.exploding"
    assert EventKind.is_finding("health.exploding")
    assert not EventKind.is_finding(EventKind.SKIP)
