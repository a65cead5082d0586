"""Findings as run-store events: the episode's range and key travel with them."""

from __future__ import annotations

import pytest

from gradguard.health import Finding, Kind, Severity
from gradguard.schema import Event


def test_an_episode_round_trips_through_its_event():
    finding = Finding(
        Kind.NONFINITE,
        Severity.CRITICAL,
        (450, 599),
        ("l2.weight",),
        {"nonfinite_steps": 150.0},
        ("advice",),
        "non-finite gradients at 150 steps (450–599)",
        key="nonfinite@450",
        open=True,
        origin="forward",
    )
    event = finding.to_event()
    assert (event.step, event.end_step, event.key) == (450, 599, "nonfinite@450")
    assert event.kind == "health.nonfinite"
    assert event.ongoing is True and event.data["origin"] == "forward"
    assert Finding.from_event(event) == finding
    assert str(finding).startswith("CRITICAL nonfinite @ steps 450–599: ")


def test_end_step_wins_over_the_payload_and_old_events_still_read():
    old = Event(7, "health.spike", "spike", {"severity": "info", "steps": [7, 7]})
    finding = Finding.from_event(old)
    assert finding.steps == (7, 7) and finding.key is None and not finding.open
    grown = Event(7, "health.spike", "m", {"steps": [7, 7]}, end_step=9, key="spike@7")
    assert Finding.from_event(grown).steps == (7, 9)


def test_other_events_are_refused():
    with pytest.raises(ValueError, match=r"health\."):
        Finding.from_event(Event(0, "skip", "x", {}))


def test_layer_labels_name_a_bare_index_as_a_layer():
    from gradguard.health.findings import layer_label

    assert layer_label("3") == "layer 3"
    assert layer_label("features.0") == "features.0" and layer_label("head") == "head"
