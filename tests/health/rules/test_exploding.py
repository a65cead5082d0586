"""``exploding``: a jump that stays, growth from the start, or norms far above the limit."""

from __future__ import annotations

from gradguard.health import HealthConfig

from ..series import batch, final, kinds, noisy, run


def test_an_order_of_magnitude_jump_is_an_episode_until_the_norm_comes_back():
    norms = noisy(0.5, 100) + noisy(20.0, 80, seed=1) + noisy(0.5, 200, seed=2)
    (finding,) = final(batch(norms), every=50)
    assert finding.kind == "exploding" and finding.severity == "warning"
    assert finding.steps == (100, 179) and not finding.open
    assert finding.evidence["peak_ratio"] >= 30
    assert "jumped" in finding.message


def test_a_jump_that_lasts_to_the_end_stays_open_with_its_true_range():
    norms = noisy(0.5, 250) + noisy(40.0, 150, seed=1)
    reports = run(batch(norms), every=50)
    assert {f.key for f in reports} == {"exploding@250"}
    assert reports[-1].steps == (250, 399) and reports[-1].open


def test_growth_from_the_first_step_is_caught_without_a_healthy_history():
    norms = [0.5 * 1.15**i for i in range(60)]  # ×4000: unstable from step one
    (finding,) = final(batch(norms))
    # from the first step above the limit (10) that is also 10× the first norm
    assert finding.kind == "exploding" and finding.steps == (22, 59)
    assert "from the run's first steps" in finding.message
    # the remedies that need no past, named only for this kind of explosion
    assert "loss=loss" in finding.advice[0] and "Rewind" in finding.advice[0]
    jump = noisy(0.5, 100) + noisy(20.0, 80, seed=1)
    (later,) = final(batch(jump), every=50)
    assert not any("Rewind" in a for a in later.advice)


def test_steady_norms_above_the_family_limit_are_not_exploding():
    # the quickstart's regression: norms ~13 from the first step, loss falling
    norms = noisy(13.0, 200, spread=0.2)
    assert final(batch(norms, loss=[16 - 0.05 * i for i in range(200)])) == []


def test_norms_far_above_the_limit_are_exploding_even_if_steady():
    norms = noisy(400.0, 60)
    (finding,) = final(batch(norms))
    assert "far above" in finding.message


def test_norms_far_above_the_limit_from_the_first_step_point_at_the_scale():
    # unstandardised regression targets: the norm is 1e4 from step 0 and does not grow
    (finding,) = final(batch(noisy(1e4, 60)))
    assert "from the first step on" in finding.message and "scale" in finding.message
    assert "generic explosion limit 10" in finding.message  # not "the default ... limit"
    assert "standardise regression targets" in finding.advice[0]  # the case's own, first
    # the same norms after a healthy start are an explosion, told as one
    (later,) = final(batch(noisy(0.5, 40) + noisy(1e4, 60, seed=1)))
    assert "from the first step" not in later.message
    assert not any("standardise" in a for a in later.advice)
    # and so is a norm that starts far above the limit and keeps growing ×1000
    (growing,) = final(batch([200.0 * 1.2**i for i in range(60)]))
    assert "from the first step on" not in growing.message


def test_advice_names_the_family_in_plain_words():
    (finding,) = final(batch(noisy(400.0, 60)), config=HealthConfig(family="rnn"))
    assert "the RNN explosion limit 20" in finding.message
    assert any("RNN models usually start at 5–10" in a for a in finding.advice)
    (generic,) = final(batch(noisy(400.0, 60)))
    assert any("generic models usually start at 1–5" in a for a in generic.advice)


def test_the_family_sets_the_limit():
    norms = [1.0, *noisy(14.0, 60)]
    assert kinds(final(batch(norms), config=HealthConfig(family="default"))) == ["exploding"]
    assert final(batch(norms), config=HealthConfig(family="cnn")) == []
