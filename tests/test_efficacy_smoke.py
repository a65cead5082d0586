"""Smoke test of the efficacy suite (benchmarks/efficacy): tiny runs, real training."""

from __future__ import annotations

import math

import pytest
import torch

import gradguard as gg
from benchmarks.efficacy import cnn, lm, loop, rnn, run_all, suite, tables
from benchmarks.efficacy.policies import DEFAULT, NONE, REWIND, NoClip, resolve, roster
from benchmarks.efficacy.suite import SWEEP


@pytest.fixture(autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _tables(text: str) -> list[list[list[str]]]:
    """Markdown tables in ``text`` as lists of rows of cells (header first)."""
    found, current = [], []
    for line in text.splitlines():
        if line.startswith("|"):
            current.append([c.strip() for c in line.strip("|").split("|")])
        elif current:
            found.append(current)
            current = []
    if current:
        found.append(current)
    return found


def test_run_all_quick_prints_a_table_per_task_and_the_summaries():
    keys = ["add-0.1", "lm-bad", "cnn-jump", "cnn"]
    text = run_all(quick=True, seeds=1, steps=4, only=keys, rows=[NONE, "clip 1", DEFAULT])
    found = _tables(text)
    assert len(found) == len(keys) + 3  # one per task, tuning burden, healthy runs, runs lost
    for table in found:
        assert set(table[1]) == {"---"}
        assert all(len(row) == len(table[0]) for row in table)
    assert [row[0] for row in found[0][2:]] == [NONE, "clip 1", DEFAULT]
    burden = found[-3]
    assert [row[0] for row in burden[2:]] == ["add-0.1", "lm-bad", "cnn-jump"]
    assert all(row[4] in {"beats", "matches", "worse"} for row in burden[2:])
    healthy = found[-2]
    assert [row[:2] for row in healthy[2:]] == [["cnn", DEFAULT]]
    lost = found[-1]
    assert [row[0] for row in lost[2:]] == keys
    # four steps teach the RNN nothing: every add-0.1 run is lost (no better than the mean)
    assert lost[2][1:5] == ["1/1", "—", "1/1", "—"]  # none, old default, default, + rewind
    assert "seeds 0–0" in text


def test_saved_folders_merge_seeds_and_later_runs_replace_the_same_seed(tmp_path):
    from benchmarks.efficacy.run import render_saved

    for seed_base, folder in ((0, "a"), (1, "b"), (1, "c")):
        run_all(
            quick=True,
            seeds=1,
            seed_base=seed_base,
            steps=3,
            only=["cnn"],
            rows=[NONE],
            save=str(tmp_path / folder),
        )
    text = render_saved([str(tmp_path / f) for f in "abc"], seeds=2)
    assert "_2 runs," in text  # seeds 0 and 1; folder c replaced b's seed 1
    assert "seeds 0–1" in text


def test_every_task_trains_a_step_under_every_kind_of_row():
    for task in suite.tasks(quick=True, steps=2):
        result = task.train(task.config, DEFAULT, gg.default_policy, 0, None)
        assert result.steps == 2 and not result.diverged
        assert math.isfinite(result.final)


def test_rows_resolve_with_and_without_rewind():
    factory, rewind = resolve(DEFAULT, SWEEP)
    assert rewind is None and isinstance(factory(), gg.Policy)
    factory, rewind = resolve(DEFAULT + REWIND, SWEEP)
    assert rewind == {} and isinstance(factory(), gg.Policy)
    with pytest.raises(ValueError, match="unknown policy"):
        resolve("no such policy", SWEEP)
    assert list(roster(SWEEP))[:6] == [NONE, "clip 0.1", "clip 0.3", "clip 1", "clip 3", "clip 10"]


def test_run_all_rejects_unknown_rows_and_tasks():
    with pytest.raises(ValueError, match="unknown policy"):
        run_all(quick=True, seeds=1, only=["add-0.1"], steps=2, rows=["no such policy"])
    with pytest.raises(ValueError, match="tasks: unknown"):
        run_all(quick=True, seeds=1, only=["no-such-task"], steps=2)


def test_guard_keeps_exploding_rnn_finite():
    config = rnn.RNNConfig(task="addition", length=20, lr=0.3, steps=60, eval_every=10)
    unguarded = rnn.train(config, NONE, NoClip, seed=0)
    assert unguarded.diverged and math.isnan(unguarded.final)
    guarded = rnn.train(config, DEFAULT, gg.default_policy, seed=0)
    assert not guarded.diverged and math.isfinite(guarded.final)
    assert guarded.clipped > 0


def test_rewind_rows_record_each_rewind():
    config = rnn.RNNConfig(task="addition", length=20, lr=0.3, steps=60, eval_every=10)
    result = rnn.train(config, NONE + REWIND, NoClip, seed=0, rewind={"every": 10})
    assert result.rewinds  # unclipped SGD at this LR turns non-finite, again and again
    assert all(e["to_step"] % 10 == 0 and e["steps_lost"] > 0 for e in result.rewinds)


def test_bad_batches_stall_unclipped_adam_and_clipping_recovers():
    config = lm.LMConfig(steps=40, bad_batches=(20, 21), vocab=8, context=12, width=16)
    reference = lm.train(lm.LMConfig(**{**config.__dict__, "bad_batches": ()}), NONE, NoClip, 0)
    unclipped = lm.train(config, NONE, NoClip, 0)
    clipped = lm.train(config, "clip 1", lambda: gg.ClipNorm(1.0), 0)
    assert len(unclipped.curve) == 38  # bad batches are left out of the curve
    assert clipped.final < unclipped.final
    assert lm.steps_lost(clipped, reference) < lm.steps_lost(unclipped, reference)


def test_lr_jump_multiplies_the_learning_rate_at_its_step():
    config = cnn.CNNConfig(steps=6, jump_at=3, jump=20.0)
    seen = []

    class Spy(NoClip):
        def update(self, state, inputs, xp):
            seen.append(inputs.lr)
            return super().update(state, inputs, xp)

    cnn.train(config, "spy", Spy, seed=0)
    assert seen == pytest.approx([0.05] * 3 + [1.0] * 3)


def test_steps_lost_reads_the_reference_curve():
    def result(final: float, curve: list[float], diverged: bool = False) -> loop.Result:
        return loop.Result("x", 0, diverged, final, curve, 0.0, 0, len(curve), 0.0)

    reference = result(1.0, [4.0] * 10 + [1.0] * 90)
    assert lm.steps_lost(result(0.5, []), reference) == 0
    assert lm.steps_lost(result(5.0, []), reference) == 99
    assert lm.steps_lost(result(math.nan, [], diverged=True), reference) == 100
    smooth = lm.smooth(reference.curve)
    first = next(i for i, v in enumerate(smooth) if v <= 2.0)
    assert lm.steps_lost(result(2.0, []), reference) == 99 - first


def _runs(finals, solved=0, diverged=0):
    return [
        loop.Result("x", i, i < diverged, f, [], 0.0, 0, 10, 0.0, solved=i < solved)
        for i, f in enumerate(finals)
    ]


def test_solve_verdict_counts_solves_then_compares_error():
    assert tables.solve_verdict(_runs([0.1] * 3, solved=2), _runs([0.1] * 3, solved=3)) == "worse"
    assert tables.solve_verdict(_runs([0.5] * 3, 3), _runs([0.1] * 3, 3)) == "matches"
    assert tables.solve_verdict(_runs([1e4] * 3), _runs([0.1] * 3)) == "worse"
    assert tables.solve_verdict(_runs([0.105] * 3), _runs([0.1] * 3)) == "matches"


def test_loss_verdict_is_within_the_seeds_noise():
    best = _runs([2.0, 2.1, 2.2])  # standard deviation 0.1
    assert tables.loss_verdict(_runs([2.15, 2.2, 2.25]), best) == "matches"
    assert tables.loss_verdict(_runs([2.3, 2.35, 2.4]), best) == "worse"
    assert tables.loss_verdict(_runs([1.8, 1.85, 1.9]), best) == "beats"
    assert tables.loss_verdict(_runs([1.0, 1.0, 1.0], diverged=1), best) == "worse"


def test_heldout_runs_the_corpus_under_each_row_and_compares_paired_losses():
    from dataclasses import replace

    from benchmarks.diagnosis.corpus import HEALTHY
    from benchmarks.efficacy import heldout

    spec = replace(HEALTHY[0], steps=6, log_every=1)
    results = heldout.measure([spec], [heldout.UNCLIPPED, *heldout.ADAPTIVE])
    row = results[spec.name]
    assert set(row) == {"monitor", "default", "zclip"}
    assert all(f["steps"] == 6 and 0.0 <= f["clipped"] <= 1.0 for f in row.values())
    assert math.isfinite(row["monitor"]["final"])
    text = heldout.render_healthy(results)
    assert spec.name in text and "of 1." in text
    assert heldout.compare(1.0, 1.04) == 0 and heldout.compare(1.0, 1.2) == -1
    assert heldout.compare(math.nan, 1.0) == 1 and heldout.compare(1.0, math.nan) == -1
    assert all(s.name.startswith(heldout.CLIPPABLE) for s in heldout.faulty_runs())
    # a rewind row trains with gradguard.Rewind: a NaN batch at step 140 is rewound
    nan_run = next(s for s in heldout.FAULTY if s.name == "nan_input_mlp")
    nan_run = replace(nan_run, steps=200, log_every=10)
    rewound = heldout.measure([nan_run], ["default + rewind"])[nan_run.name]["default + rewind"]
    assert rewound["rewinds"] >= 1 and math.isfinite(rewound["final"])
    assert f"{rewound['rewinds']} rewinds" in heldout._cell(rewound, row["monitor"])
    more = heldout.reseeded([spec], 3)
    assert [(s.name, s.seed) for s in more] == [
        (spec.name, spec.seed),
        (f"{spec.name}@1", spec.seed + 1000),
        (f"{spec.name}@2", spec.seed + 2000),
    ]


def test_grid_trains_a_classifier_and_the_sgd_step_rule_leaves_a_stable_run_alone():
    from benchmarks.efficacy import grid

    # iris, softmax regression, plain SGD at lr 0.3: stable, so the default's SGD step
    # rule never acts and the default ends where the default without it does
    with_rule = grid.final_loss("iris", "linear", 0.3, 0.0, "default", 0)
    without = grid.final_loss("iris", "linear", 0.3, 0.0, "fb:step_ratio=0", 0)
    unclipped = grid.final_loss("iris", "linear", 0.3, 0.0, "none", 0)
    assert math.isfinite(with_rule) and with_rule == without
    assert with_rule == pytest.approx(unclipped, rel=0.05)


def test_sgd_variants_train_with_nesterov_and_restore_torchs_sgd():
    from benchmarks.efficacy import sgd_variants

    seen = []
    original = torch.optim.SGD

    def spy(config, name, factory, seed, rewind):
        seen.append(torch.optim.SGD)
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
        seen.append(optimizer.param_groups[0]["nesterov"])
        return loop.Result(name, seed, False, 1.0, [], 0.0, 0, 1, 0.0)

    case = sgd_variants.CASES["cnn-nesterov"]
    sgd_variants.CASES["spy"] = sgd_variants.Case(spy, case.config, nesterov=True)
    try:
        assert sgd_variants._job("spy", "default", 5) == (1.0, 0.0)
    finally:
        del sgd_variants.CASES["spy"]
    assert seen == [sgd_variants.NesterovSGD, True]
    assert torch.optim.SGD is original


def test_fitted_counts_the_steps_a_policy_clips():
    from benchmarks.efficacy import fitted

    final, rate, late = fitted.train("iris", "sgd-plain", "clip 0.1", 0, steps=40)
    free, none_rate, _ = fitted.train("iris", "sgd-plain", "none", 0, steps=40)
    assert math.isfinite(final) and math.isfinite(free)
    assert rate > 0.9 and late > 0.9  # iris's first gradients are far above 0.1
    assert none_rate == 0.0


def test_families_train_every_set_up_and_read_back_the_findings():
    from benchmarks.efficacy import families

    for family in families.FAMILIES:
        final, rate, found = families.train(family, "sgd", "restarts", "none", 0, steps=12)
        assert math.isfinite(final) and rate == 0.0 and found == []
    # a summed loss's norms are far above 0.1: every step clipped, and the store says so
    _, rate, found = families.train("summed", "adam", "constant", "clip 0.1", 0, steps=150)
    assert rate == 1.0 and found == ["clip_saturated@0"]
    gauss, _, _ = families.train("gauss-nll", "adam", "constant", "none", 0, steps=300)
    assert gauss < 0  # a negative log-likelihood that goes below zero, as documented
    # the monitor row measures and diagnoses the same run without changing a step
    watched, rate, _ = families.train("gauss-nll", "adam", "constant", "monitor", 0, steps=300)
    assert watched == gauss and rate == 0.0


def test_finetune_starts_from_a_trained_model_and_counts_divergences():
    from benchmarks.efficacy import finetune

    # pre-trained: the first fine-tuning losses are far below an untrained model's
    for setup in finetune.SETUPS:
        final, rate, divergences, found = finetune.train(setup, "sgd", "none", 0, steps=5)
        assert math.isfinite(final) and rate == 0.0 and divergences == 0 and found == []
    trained, _, _, _ = finetune.train("digits", "adam", "none", 0, steps=5)
    assert trained < 0.3  # an untrained 10-class model starts near ln 10 = 2.3
    # the monitor row changes no step
    watched, rate, _, _ = finetune.train("wine", "adam", "monitor", 0, steps=30)
    free, _, _, _ = finetune.train("wine", "adam", "none", 0, steps=30)
    assert watched == free and rate == 0.0


def test_sweep_arguments_put_the_unclipped_row_first_and_type_the_extras():
    from benchmarks.efficacy.parallel import sweep_arguments

    argv = ["--rows", "default,clip 1", "--steps", "50"]
    args, rows = sweep_arguments(argv, None, (), 3, steps=9)
    assert rows == ["none", "default", "clip 1"] and args.steps == 50 and args.seeds == 3
    _, kept = sweep_arguments(["--rows", "clip 1,none"], None, (), 3)
    assert kept == ["clip 1", "none"]


def test_blind_trains_every_task_and_judges_the_default_by_the_suites_rule():
    from benchmarks.efficacy import blind

    for key in blind.TASKS:
        final, rate = blind.train(key, "none", 101, steps=3)
        assert math.isfinite(final) and rate == 0.0
    # the GRU's first gradients are far above 0.1: every step clipped, and counted
    final, rate = blind.train("gru-sgd-0.5", "clip 0.1", 101, steps=4)
    assert math.isfinite(final) and rate == 1.0
    # a lost seed outweighs any median; then the median against the other's seed noise
    assert blind.verdict([1.0, 1.1, math.inf], [2.0, 2.1, 2.2]) == "worse"
    assert blind.verdict([1.05, 1.0, 0.95], [1.0, 1.1, 0.9]) == "matches"
    assert blind.verdict([0.5, 0.5, 0.5], [1.0, 1.01, 0.99]) == "beats"
    done = {(k, r): [(1.0, 0.0), (1.0, 0.5)] for k in ["wine-mlp-sgd-0.3"] for r in blind.ROWS}
    text = blind.report(["wine-mlp-sgd-0.3"], list(blind.ROWS), done)
    assert "| wine-mlp-sgd-0.3 | 1 | clip 0.1: 1 | 1 (25% clipped) | matches | matches |" in text
