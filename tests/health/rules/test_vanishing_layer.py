"""``vanishing_layer``: layers whose gradient is vanishingly small."""

from __future__ import annotations

from ..series import batch, final, noisy

NAMES = ("l0.weight", "l0.bias", "l1.weight", "l2.weight")


def layers(rows):
    snaps = [(10 * i, row) for i, row in enumerate(rows)]
    return final(batch(noisy(0.5, 10 * len(rows)), names=NAMES, snapshots=snaps), every=10)


def test_absolute_and_relative_vanishing():
    (finding,) = layers([[1e-9, 1e-9, 1e-3, 1e-3]] * 3)
    assert finding.kind == "vanishing_layer" and finding.params == ("l0",)
    assert finding.steps == (0, 20)
    (relative,) = layers([[1e-7, 0.0, 0.05, 1.0]] * 3)
    assert relative.evidence["min_share"] < 1e-5 and relative.origin == "l0"


def test_one_episode_while_any_layer_vanishes():
    rows = [[1e-9, 1e-9, 1e-3, 1e-3]] * 3 + [[1e-3, 1e-3, 1e-9, 1e-3]] * 3
    (finding,) = layers(rows)
    assert set(finding.params) == {"l0", "l1"} and finding.steps == (0, 50)


def test_healthy_spread_is_not_vanishing():
    assert layers([[1e-3, 1e-3, 1e-2, 1e-1]] * 4) == []


def test_layers_of_a_model_that_fits_its_data_are_not_vanishing():
    rows = [[1e-9, 1e-9, 1e-3, 1e-3]] * 6
    snaps = [(10 * i, row) for i, row in enumerate(rows)]
    norms = noisy(0.5, 60)
    fitted = [1.0] * 10 + [1e-5] * 50
    found = final(batch(norms, loss=fitted, names=NAMES, snapshots=snaps[1:]), every=10)
    assert [f for f in found if f.kind == "vanishing_layer"] == []
    stuck = [1.0] * 60
    found = final(batch(norms, loss=stuck, names=NAMES, snapshots=snaps[1:]), every=10)
    assert [f.kind for f in found if f.kind == "vanishing_layer"] == ["vanishing_layer"]
