"""``dead_layer``: layers with exactly zero gradient, or none at all."""

from __future__ import annotations

from gradguard.health import HealthConfig

from ..series import batch, final, kinds, noisy

NAMES = ("l0.weight", "l0.bias", "l1.weight", "l2.weight")


def layers(rows, config=None, order=None):
    snaps = [(10 * i, row) for i, row in enumerate(rows)]
    return final(
        batch(noisy(0.5, 10 * len(rows)), names=NAMES, snapshots=snaps),
        config=config,
        order=order,
        every=10,
    )


def test_a_layer_with_zero_gradient_is_dead_from_its_first_zero_snapshot():
    rows = [[0.1, 0.1, 0.2, 0.2]] * 3 + [[0.1, 0.1, 0.0, 0.2]] * 5
    (finding,) = layers(rows)
    assert finding.kind == "dead_layer" and finding.params == ("l1",)
    assert finding.steps == (30, 70) and finding.open


def test_a_dead_bias_inside_a_live_layer_is_not_a_dead_layer():
    assert layers([[0.1, 0.0, 0.1, 0.2]] * 4) == []
    per_tensor = layers([[0.1, 0.0, 0.1, 0.2]] * 4, HealthConfig(group_by_module=False))
    assert per_tensor[0].params == ("l0.bias",)


def test_one_zero_snapshot_is_not_enough():
    assert layers([[0.1, 0.1, 0.0, 0.2], [0.1, 0.1, 0.1, 0.2]] * 2) == []


class Order:
    """A backward order that saw no gradient reach l0 (detached in forward)."""

    def first_nonfinite(self, names):
        return None

    def unreached(self):
        return ("l0.weight", "l0.bias")


def test_parameters_that_never_get_a_gradient_are_reported_from_the_first_step():
    rows = [[0.1, 0.1, 0.1, 0.2]] * 4
    (finding,) = layers(rows, order=Order())
    assert kinds([finding]) == ["dead_layer"] and finding.params == ("l0",)
    assert finding.steps == (0, 30)
    assert "no gradient at all" in finding.message and finding.origin == "l0"


def test_the_finding_names_where_the_gradient_stops():
    rows = [[0.0, 0.0, 0.0, 0.2]] * 3  # l0 and l1 zero: the gradient stops at l1
    (finding,) = layers(rows)
    assert finding.origin == "l1" and finding.params == ("l1", "l0")
    assert "gradient stops at l1: exactly zero there and in the 1 layer(s) before it" in (
        finding.message
    )
