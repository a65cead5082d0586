"""The per-layer view's data: model-order rows under parent groups, exact last column,
compact codes that decode back to the norms, bounded for wide models."""

from __future__ import annotations

import base64

import numpy as np
import pytest

from gradguard.report import load_run, render_report
from gradguard.report.heatmap import (
    FLAT_ROWS,
    MAX_CELLS,
    column_starts,
    heatmap_payload,
    hierarchy,
    layer_rows,
    merge_layers,
    quantize,
)
from tests.report.runs import write_synthetic


def decode(payload):
    codes = np.frombuffer(base64.b64decode(payload["codes"]), dtype="<u2")
    codes = codes.reshape(len(payload["rows"]), len(payload["start"]))
    lo, hi = payload["lo"], payload["hi"]
    values = 10 ** (lo + (codes.astype(float) - 1) / 65533 * (hi - lo))
    values[codes == 0] = 0.0
    values[codes == 65535] = np.inf
    return values


def test_the_last_snapshot_has_a_column_of_its_own():
    starts = column_starts(20_000, 400)
    assert starts.size == 400 and starts[-1] == 19_999 and starts[-2] < 19_999
    assert column_starts(5, 400).tolist() == [0, 1, 2, 3, 4]
    assert column_starts(1, 400).tolist() == [0]


def test_codes_decode_to_the_norms_within_a_tenth_of_a_percent():
    values = np.array([1e-9, 3.3e-4, 1.0, 7.5e3, 0.0, np.inf, np.nan])
    codes = quantize(values, -9.0, 4.0)
    assert codes[4] == 0 and codes[5] == codes[6] == 65535
    back = 10 ** (-9.0 + (codes[:4].astype(float) - 1) / 65533 * 13.0)
    np.testing.assert_allclose(back, values[:4], rtol=1e-3)


def test_a_transformer_is_grouped_by_block_with_its_modules_inside():
    names = ["embed.weight"]
    for b in range(12):
        for m in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "ln1", "ln2"):
            names += [f"blocks.{b}.{m}.weight", f"blocks.{b}.{m}.bias"]
    names += ["head.weight"]
    layers = tuple(dict.fromkeys(n.rsplit(".", 1)[0] for n in names))
    assert len(layers) > FLAT_ROWS
    parents, parent = hierarchy(tuple(names), layers)
    assert parents == ["embed", "blocks.0", *[f"blocks.{b}" for b in range(1, 12)], "head"]
    assert parent[layers.index("blocks.3.mlp.fc1")] == parents.index("blocks.3")


def test_a_flat_model_is_grouped_in_blocks_of_consecutive_layers():
    names = tuple(f"m{i}.weight" for i in range(100))
    layers = tuple(f"m{i}" for i in range(100))
    parents, parent = hierarchy(names, layers)
    assert len(parents) == 10 and parents[0] == "m0 … m9"
    assert parent.tolist() == [i // 10 for i in range(100)]
    assert hierarchy(names[:5], layers[:5])[0] == []  # few layers: no groups


def test_rows_hold_each_group_then_its_layers_with_group_norms_combined(tmp_path):
    names = [f"blocks.{b}.{m}.weight" for b in range(10) for m in ("a", "b", "c", "d", "e")]
    write_synthetic(tmp_path / "run", 200, names, every=10, batch=200)
    run = load_run(tmp_path / "run", rules=False)
    plan = layer_rows(run.names, run.layers)
    rows, norms = plan.rows, plan.matrix(run.layer_norms)
    assert rows[0] == {"name": "blocks.0", "parent": -1, "group": True, "members": 5}
    assert [r["name"] for r in rows[1:6]] == [f"blocks.0.{m}" for m in "abcde"]
    assert all(r["parent"] == 0 for r in rows[1:6])
    assert len(rows) == 60 and norms.shape == (20, 60)
    np.testing.assert_allclose(norms[:, 0], np.sqrt((norms[:, 1:6] ** 2).sum(1)))
    np.testing.assert_allclose(norms[:, 1:6], run.layer_norms[:, :5])
    payload = heatmap_payload(run)  # 20 snapshots: one column each, exact
    np.testing.assert_allclose(decode(payload), norms.T, rtol=2e-3)
    assert payload["start"][-1] == payload["end"][-1] == run.snapshot_steps[-1]
    assert sum(payload["count"]) == run.snapshot_steps.size


def test_very_wide_models_merge_consecutive_layers():
    layers = tuple(f"m{i}" for i in range(10))
    norms = np.arange(1.0, 11.0)[None, :]
    merged, values = merge_layers(layers, norms, limit=4)
    assert merged == (
        "m0 … m1 (2 layers)",
        "m2 … m4 (3 layers)",
        "m5 … m6 (2 layers)",
        "m7 … m9 (3 layers)",
    )
    want = [np.sqrt(1 + 4), np.sqrt(9 + 16 + 25), np.sqrt(36 + 49), np.sqrt(64 + 81 + 100)]
    np.testing.assert_allclose(values[0], want)


def test_spikes_survive_column_bucketing(tmp_path):
    names = ["a.weight", "b.weight"]
    write_synthetic(tmp_path / "run", 40_000, names, every=5, batch=40_000)
    run = load_run(tmp_path / "run", rules=False)
    run.layer_norms[1234, 1] = 5e3
    payload = heatmap_payload(run)
    values = decode(payload)
    assert len(payload["start"]) == 400
    column = np.searchsorted(payload["start"], run.snapshot_steps[1234], side="right") - 1
    assert values[1, column] == pytest.approx(5e3, rel=2e-3)


def test_a_thousand_tensors_stay_small(tmp_path):
    names = [
        f"blocks.{i // 20}.layer{(i % 20) // 2}.{('weight', 'bias')[i % 2]}" for i in range(1000)
    ]
    write_synthetic(tmp_path / "run", 20_000, names, every=20, batch=20_000)
    run = load_run(tmp_path / "run", rules=False)
    payload = heatmap_payload(run)
    cells = len(payload["rows"]) * len(payload["start"])
    assert len(payload["rows"]) == 500 + 50 and cells <= MAX_CELLS
    assert len(payload["codes"]) < 1.4e6
    assert len(render_report(tmp_path / "run", rules=False).encode()) < 1.6e6


def test_a_run_without_snapshots_has_no_heatmap(tmp_path):
    write_synthetic(tmp_path / "run", 30, ["a.weight"], every=1000, batch=30)
    run = load_run(tmp_path / "run", rules=False)
    run.layer_norms = np.zeros((0, 1))
    assert heatmap_payload(run) is None
