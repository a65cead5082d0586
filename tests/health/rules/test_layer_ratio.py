"""``layer_ratio``: adjacent layers orders of magnitude apart."""

from __future__ import annotations

import pytest

from ..series import batch, final, noisy

NAMES = ("l0.weight", "l0.bias", "l1.weight", "l2.weight")


def layers(rows):
    snaps = [(10 * i, row) for i, row in enumerate(rows)]
    return final(batch(noisy(0.5, 10 * len(rows)), names=NAMES, snapshots=snaps), every=10)


def test_adjacent_layers_1000x_apart():
    (finding,) = layers([[1e-4, 0.0, 0.1, 0.2]] * 3)
    assert finding.kind == "layer_ratio" and finding.params == ("l0", "l1")
    assert finding.evidence["max_ratio"] == pytest.approx(1000.0)


def test_10x_apart_is_fine():
    assert layers([[0.01, 0.0, 0.1, 0.2]] * 3) == []


def test_a_bare_sequential_index_is_named_as_a_layer_not_read_as_a_number():
    names = ("0.weight", "0.bias", "1.weight", "2.weight")
    snaps = [(10 * i, [1e-4, 0.0, 0.1, 0.2]) for i in range(3)]
    (finding,) = final(batch(noisy(0.5, 30), names=names, snapshots=snaps), every=10)
    assert finding.params == ("0", "1")
    assert "(layer 0 vs layer 1)" in finding.message
