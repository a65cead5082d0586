"""``loss_scale_collapse``: the loss scale fell below 1: fp16 gradients underflow."""

from __future__ import annotations

from ..series import AMP, INF, batch, final, kinds


def test_a_scale_halving_every_step_collapses_from_where_it_began_to_fall():
    n, start = 300, 150
    scale = [65536.0] * (start + 1) + [65536.0 / 2 ** (i + 1) for i in range(n - start - 1)]
    over = [i >= start for i in range(n)]
    found = final(
        batch(
            [INF if o else 0.5 for o in over],
            skipped=[float(o) for o in over],
            reason=[AMP if o else 0.0 for o in over],
            scale=scale,
        ),
        every=20,
    )
    (collapse,) = [f for f in found if f.kind == "loss_scale_collapse"]
    assert collapse.steps == (start, n - 1) and collapse.severity == "critical"
    assert collapse.evidence["loss_scale_from"] == 65536.0
    assert collapse.evidence["loss_scale_min"] < 1e-30
    assert "amp_overflow" in kinds(found)


def test_a_scale_that_settles_above_one_is_fine():
    scale = [65536.0 / 2**i for i in range(10)] + [128.0] * 200
    assert final(batch([0.5] * 210, scale=scale)) == []
