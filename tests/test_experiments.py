"""The seeds' experiments reproduce the phenomena they are meant to show."""

from __future__ import annotations

from gradguard.experiments import (
    first_layer_norm_vs_depth,
    format_table,
    max_grad_vs_sequence_length,
)


def test_vanishing_with_depth_and_the_he_init_remedy():
    curves = {c.label: c for c in first_layer_norm_vs_depth(depths=(5, 10, 20))}
    sigmoid = curves["sigmoid"].values
    assert sigmoid[0] > sigmoid[1] > sigmoid[2]
    assert sigmoid[2] < 1e-8  # vanished at depth 20 (seeds: per-layer norm < 1e-8)
    assert curves["relu + He init"].values[2] > 1e3 * curves["relu"].values[2]


def test_exploding_with_sequence_length():
    curves = max_grad_vs_sequence_length(lengths=(10, 200))
    seeds_setup, orthogonal = curves
    # The seeds' W_hh = 2.0 saturates tanh: the gradient no longer grows with length.
    assert max(seeds_setup.values) / min(seeds_setup.values) < 1.01
    assert orthogonal.values[1] > 100 * orthogonal.values[0]


def test_table_has_one_row_per_curve():
    curves = max_grad_vs_sequence_length(lengths=(10, 20))
    table = format_table("title", "length", curves).splitlines()
    assert table[0] == "title"
    assert table[1].split()[-2:] == ["10", "20"]
    assert len(table) == 2 + len(curves)
