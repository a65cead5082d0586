"""``layer_dispersion``: one layer carrying almost all the gradient."""

from __future__ import annotations

from gradguard.health import HealthConfig

from ..series import batch, final, kinds, noisy

NAMES = tuple(f"l{i}.weight" for i in range(20))


def layers(rows, config=None):
    snaps = [(10 * i, row) for i, row in enumerate(rows)]
    return final(
        batch(noisy(0.5, 10 * len(rows)), names=NAMES, snapshots=snaps), config=config, every=10
    )


def one_dominant(factor=100.0):
    row = [0.01 * (1 + 0.01 * i) for i in range(20)]
    row[10] = 0.01 * factor
    return row


def test_one_layer_far_above_the_others_is_dispersion():
    (finding,) = layers([one_dominant(90.0)] * 3)  # 90×: under layer_ratio's 100
    assert finding.kind == "layer_dispersion"
    assert finding.params == ("l10", "l0")
    assert finding.evidence["ratio"] > 3 and finding.evidence["largest_share"] > 0.9


def test_an_adjacent_jump_is_left_to_layer_ratio():
    assert kinds(layers([one_dominant(1000.0)] * 3)) == ["layer_ratio"]


def test_the_seed_ratio_of_five_needs_27_layers():
    # population std of 20 positive norms is at most sqrt(19) = 4.36 × their mean
    strict = HealthConfig(dispersion_ratio=5.0, layer_ratio=1e9)
    assert layers([one_dominant(1e3)] * 3, strict) == []
