"""``nonfinite``: an episode of non-finite steps, and where it started."""

from __future__ import annotations

from gradguard.health.findings import BACKWARD, FORWARD
from gradguard.schema import EventKind, skip_event

from ..series import AMP, INF, NAN, NONFINITE, batch, final, kinds, noisy, run

NAMES = ("l0.weight", "l1.weight", "l2.weight", "l3.weight")


class Order:
    """Backward order: l3 first (the output layer), l0 last."""

    def first_nonfinite(self, names):
        return next((n for n in reversed(NAMES) if n in set(names)), None)


def test_one_nan_step_with_a_nan_loss_is_blamed_on_the_forward_pass():
    norms, loss = noisy(0.5, 40), noisy(2.0, 40)
    norms[20], loss[20] = NAN, NAN
    snapshot = (20, [NAN] * 4)  # every gradient non-finite, the output layer first
    (finding,) = final(batch(norms, loss=loss, names=NAMES, snapshots=[snapshot]), order=Order())
    assert finding.kind == "nonfinite" and finding.severity == "critical"
    assert finding.steps == (20, 20)
    assert finding.origin == FORWARD and "forward pass" in finding.message
    assert "origin l3" not in finding.message and "born in backward" not in finding.message
    # the evidence still shows the first non-finite parameter in backward order
    assert finding.params[0] == "l3.weight" and finding.evidence["nonfinite_fraction"] == 1.0
    assert "first in backward order l3.weight" in finding.message
    assert finding.evidence["loss_nonfinite_steps"] == 1


def test_every_gradient_nonfinite_with_a_finite_loss_is_still_the_forward_pass():
    norms = noisy(0.5, 30)
    norms[10] = NAN
    (finding,) = final(
        batch(norms, loss=noisy(2.0, 30), names=NAMES, snapshots=[(10, [NAN] * 4)]),
        order=Order(),
    )
    assert finding.origin == FORWARD
    assert finding.evidence["nonfinite_fraction"] == 1.0


def test_nan_born_in_backward_names_the_first_parameter_in_backward_order():
    norms = noisy(0.5, 30)
    norms[12] = NAN
    snapshot = (12, [NAN, INF, NAN, 0.3])  # l3 (output) finite: born below it, at l2
    (finding,) = final(
        batch(norms, loss=noisy(2.0, 30), names=NAMES, snapshots=[snapshot]), order=Order()
    )
    assert finding.origin == "l2.weight"
    assert finding.params[0] == "l2.weight" and set(finding.params) == set(NAMES[:3])
    assert finding.evidence["nonfinite_tensors"] == 3 and finding.evidence["origin_exact"] == 1
    assert "born in backward at l2.weight" in finding.message


def test_finite_loss_without_a_snapshot_says_backward_without_naming_a_layer():
    norms = noisy(0.5, 30)
    norms[7] = INF
    (finding,) = final(batch(norms, loss=noisy(2.0, 30)))
    assert finding.origin == BACKWARD
    assert any("per-tensor" in a for a in finding.advice)


def test_unrecorded_loss_leaves_the_origin_unknown():
    (finding,) = final(batch([0.5] * 10 + [INF]))
    assert finding.origin is None
    assert any("loss=loss" in a for a in finding.advice)


def test_the_episode_spans_every_nonfinite_step_and_closes_after_rearm_steps():
    norms = noisy(0.5, 600)
    norms[150:300] = [NAN] * 150
    loss = noisy(2.0, 600)
    loss[150:300] = [NAN] * 150
    reports = [f for f in run(batch(norms, loss=loss), every=50) if f.kind == "nonfinite"]
    keys = {f.key for f in reports}
    assert len(keys) == 1  # one episode, updated as it grew
    assert [f.steps for f in reports] == [(150, 199), (150, 249), (150, 299), (150, 299)]
    assert reports[-2].open and not reports[-1].open  # closed after 100 finite steps
    assert "150 steps (150–299)" in reports[-1].message


def test_a_skip_event_locates_an_episode_reported_earlier():
    from gradguard.health import HealthMonitor

    norms = noisy(0.5, 40)
    norms[30] = NAN
    monitor = HealthMonitor()
    (first,) = monitor.update(batch(norms, loss=noisy(2.0, 40), names=NAMES))
    assert first.origin == BACKWARD
    monitor.note_events([skip_event(30, "nonfinite", ["l1.weight", "l0.weight"], "l1.weight")])
    (located,) = monitor.update(batch(noisy(0.5, 10), start=40, loss=noisy(2.0, 10), names=NAMES))
    assert located.key == first.key and located.origin == "l1.weight"
    assert located.evidence["nonfinite_tensors"] == 2 and located.evidence["tensors"] == 4
    assert EventKind.SKIP == "skip"


def test_skip_flags_count_but_amp_overflows_do_not():
    found = final(batch([0.5] * 5, skipped=[0, 0, 1, 0, 0], reason=[0, 0, NONFINITE, 0, 0]))
    assert kinds(found) == ["nonfinite"]
    quiet = final(batch([0.5, 0.5, INF, 0.5], skipped=[0, 0, 1, 0], reason=[0, 0, AMP, 0]))
    assert quiet == []


def _nonfinite(findings):
    (finding,) = [f for f in findings if f.kind == "nonfinite"]
    return finding


def test_a_nan_loss_right_after_an_explosion_is_blamed_on_it_not_on_the_data():
    norms, loss = noisy(0.5, 40), noisy(2.0, 40)
    norms[17:20] = [50.0, 4e3, 2e6]  # the gradient explodes, the next forward overflows
    norms[20], loss[20] = NAN, NAN
    finding = _nonfinite(final(batch(norms, loss=loss)))
    assert finding.origin == FORWARD and finding.steps == (20, 20)
    assert "exploding updates" in finding.message and "input batch" in finding.message
    assert "rather than the input batch" in finding.message
    assert finding.evidence["growth_before"] > 1e6
    assert "exploded first" in finding.advice[0]


def test_a_nan_loss_after_ordinary_norms_still_names_the_input_batch():
    norms, loss = noisy(0.5, 40), noisy(2.0, 40)
    norms[19] = 20.0  # a spike, far from an explosion
    norms[20], loss[20] = NAN, NAN
    finding = _nonfinite(final(batch(norms, loss=loss)))
    assert "the forward pass, the loss or the input batch" in finding.message
    assert "exploding" not in finding.message and "growth_before" not in finding.evidence


def test_the_explosion_is_seen_across_flushes():
    norms, loss = noisy(0.5, 40), noisy(2.0, 40)
    norms[19] = 2e6  # the last step of the first flush
    norms[20], loss[20] = NAN, NAN
    finding = _nonfinite(final(batch(norms, loss=loss), every=20))
    assert "exploding updates" in finding.message


def test_an_infinite_loss_with_finite_gradients_is_told_as_a_broken_objective():
    # log(relu(x)): the loss is inf where relu is 0, relu's backward masks the gradient
    norms, loss = noisy(0.5, 300), noisy(2.0, 300)
    loss[100:105] = [INF] * 5
    (finding,) = final(batch(norms, loss=loss))
    assert finding.kind == "nonfinite" and finding.steps == (100, 104)
    assert finding.severity == "warning" and finding.origin == FORWARD
    assert "infinite loss at 5 steps (100–104)" in finding.message
    assert "every gradient stayed finite" in finding.message
    assert "clamp" in finding.advice[0]
    assert finding.evidence["loss_nonfinite_steps"] == 5


def test_a_step_recorded_without_its_loss_or_an_amp_overflow_is_no_loss_finding():
    norms, loss = noisy(0.5, 300), noisy(2.0, 300)
    loss[50:60] = [NAN] * 10  # NaN: the store cannot tell it from a loss not given
    loss[200] = INF  # the GradScaler skipped this step for an overflow
    reason = [0.0] * 300
    reason[200] = AMP
    skipped = [0.0] * 300
    skipped[200] = 1.0
    found = final(batch(norms, loss=loss, skipped=skipped, reason=reason))
    assert "nonfinite" not in kinds(found)
