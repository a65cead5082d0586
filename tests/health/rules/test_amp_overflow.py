"""``amp_overflow``: the GradScaler keeps skipping steps after its calibration."""

from __future__ import annotations

import numpy as np

from ..series import AMP, INF, batch, final, kinds


def amp_batch(flags, scale=None):
    return batch(
        [INF if o else 1.0 for o in flags],
        skipped=[float(o) for o in flags],
        reason=[AMP if o else 0.0 for o in flags],
        scale=scale,
    )


def every(k, n, offset=0):
    return [(i + offset) % k == 0 for i in range(n)]


def test_frequent_overflows_span_the_first_to_the_last_overflow():
    flags = [False] * 100 + every(10, 300) + [False] * 200
    scale = np.geomspace(65536.0, 256.0, len(flags)).tolist()
    (finding,) = final(amp_batch(flags, scale), every=50)
    assert finding.kind == "amp_overflow" and finding.severity == "warning"
    assert finding.steps == (100, 390) and not finding.open
    ev = finding.evidence
    assert ev["overflows"] == 30  # every overflow of the episode, those before it opened too
    assert ev["window"] == 200 and ev["amp_overflow_rate"] == 0.05
    assert "skipped 30 steps (100–390)" in finding.message
    assert ev["loss_scale_last"] < ev["loss_scale_first"]
    assert any("bfloat16" in a for a in finding.advice)
    assert "nonfinite" not in kinds(final(amp_batch(flags, scale)))


def test_the_calibration_run_that_opens_the_run_is_not_counted():
    flags = [True] * 16 + [False] * 300  # the initial scale backing off: normal
    assert final(amp_batch(flags)) == []


def test_rare_overflows_are_normal():
    assert final(amp_batch(every(40, 400, offset=5))) == []
