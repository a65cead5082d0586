"""Per-example norms equal a loop over single examples; fraction clipped; monitor events;
models that cannot be wrapped get Opacus's reason, named."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

import gradguard as gg
from gradguard.privacy import (
    PerSampleMonitor,
    PerSampleNorms,
    PrivacyModelError,
    check_model,
    from_functional,
    from_grad_sample,
    norms_of,
    wrap_model,
)
from tests.conftest import forbid_host_sync

torch.set_num_threads(1)


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv1d(2, 3, 3), nn.Flatten(), nn.LayerNorm(12), nn.Tanh(), nn.Linear(12, 4)
    )


def batch(n: int = 7):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 2, 6, generator=g), torch.randint(0, 4, (n,), generator=g)


def loop_norms(model: nn.Module, x, y, loss_fn) -> tuple[np.ndarray, list[str]]:
    """The reference: one backward per example; (n, P) per-tensor norms."""
    names = [n for n, _ in model.named_parameters()]
    rows = []
    for i in range(len(x)):
        model.zero_grad()
        loss_fn(model(x[i : i + 1]), y[i : i + 1]).backward()
        rows.append([p.grad.norm().item() for p in model.parameters()])
    model.zero_grad()
    return np.array(rows), names


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_functional_norms_equal_a_loop_over_single_examples(reduction):
    model = small_model()
    x, y = batch()
    loss_fn = nn.CrossEntropyLoss(reduction=reduction)
    expected, names = loop_norms(model, x, y, loss_fn)
    before = [p.detach().clone() for p in model.parameters()]
    norms = from_functional(model, loss_fn, x, y, chunk_size=3)
    np.testing.assert_allclose(norms.layer.numpy(), expected, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(
        norms.total.numpy(), np.sqrt((expected**2).sum(1)), rtol=1e-5, atol=1e-7
    )
    assert norms.names == tuple(names)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(p.grad is None for p in model.parameters())


def test_opacus_grad_sample_norms_equal_a_loop_over_single_examples():
    pytest.importorskip("opacus")
    model = small_model()
    x, y = batch()
    loss_fn = nn.CrossEntropyLoss()
    expected, names = loop_norms(model, x, y, loss_fn)
    wrapped = wrap_model(model)
    loss_fn(wrapped(x[:4]), y[:4]).backward()
    loss_fn(wrapped(x[4:]), y[4:]).backward()  # accumulated: grad_sample becomes a list
    norms = from_grad_sample(wrapped)
    np.testing.assert_allclose(norms.layer.numpy(), expected, rtol=1e-5, atol=1e-7)
    assert norms.names == tuple(names)


def test_fraction_clipped_matches_the_threshold():
    rng = np.random.default_rng(0)
    values = rng.lognormal(0.0, 1.0, size=(501, 3))
    norms = PerSampleNorms(torch.tensor(values, dtype=torch.float64))
    total = np.sqrt((values**2).sum(1))
    ranked = np.sort(total)
    for k in (0, 1, 100, 250, 499, 500):
        # a threshold between the k-th and (k+1)-th smallest norm clips exactly 501 - k - 1
        clip = ranked[k] if k == 500 else (ranked[k] + ranked[k + 1]) / 2
        expected = (total > clip).mean()
        assert norms.fraction_clipped(clip).item() == pytest.approx(expected, abs=1e-12)
        assert expected == pytest.approx((500 - k) / 501)
    q = norms.quantiles((0.1, 0.5, 0.9)).numpy()
    np.testing.assert_allclose(q, np.quantile(total, [0.1, 0.5, 0.9]), rtol=1e-6)
    by_layer = norms.quantiles((0.5,), by_layer=True).numpy()
    np.testing.assert_allclose(by_layer[:, 0], np.median(values, axis=0), rtol=1e-6)


def test_an_empty_batch_gives_nan_summaries_not_an_error():
    norms = norms_of([torch.zeros(0, 4, 2), torch.zeros(0, 3)], ["a", "b"])
    assert len(norms) == 0
    assert torch.isnan(norms.quantiles()).all()
    assert torch.isnan(norms.fraction_clipped(1.0))


def test_monitor_records_one_event_per_step_at_the_recorders_flush(tmp_path):
    recorder = gg.Recorder(tmp_path / "run", log_every=4)
    monitor = PerSampleMonitor(recorder, quantiles=(0.5, 0.9), by_layer=True)
    recorder.start(["w"], [(1,)])
    rng = np.random.default_rng(2)
    kept = []
    for step in range(8):
        values = rng.lognormal(size=(32, 2))
        kept.append(values)
        norms = PerSampleNorms(torch.tensor(values, dtype=torch.float32), ("a.weight", "b.bias"))
        with forbid_host_sync():
            monitor.observe(step, norms, clip_norm=1.5)
        recorder.record(
            step,
            total_norm=1.0,
            clipped_norm=1.0,
            clip_coef=1.0,
            threshold=1.0,
            skipped=0,
            reason=0,
        )
        # the summaries reach the store with the recorder's flushes, every 4 steps
        recorder.drain()  # written on the recorder's writer thread
        stored = gg.RunStore.open(tmp_path / "run").events(kind="per_sample")
        assert len(stored) == 4 * ((step + 1) // 4)
    recorder.close()
    events = gg.RunStore.open(tmp_path / "run").events(kind="per_sample")
    assert [e.step for e in events] == list(range(8))
    for event, values in zip(events, kept):
        total = np.sqrt((values**2).sum(1))
        data = event.data
        assert data["n"] == 32 and data["clip_norm"] == 1.5
        assert data["fraction_clipped"] == pytest.approx((total > 1.5).mean())
        assert data["quantiles"]["0.5"] == pytest.approx(np.quantile(total, 0.5), rel=1e-5)
        assert data["quantiles"]["0.9"] == pytest.approx(np.quantile(total, 0.9), rel=1e-5)
        assert data["max"] == pytest.approx(total.max(), rel=1e-6)
        layer_medians = np.median(values, axis=0)
        assert data["layers"]["a.weight"]["0.5"] == pytest.approx(layer_medians[0], rel=1e-5)
        assert data["layers"]["b.bias"]["0.5"] == pytest.approx(layer_medians[1], rel=1e-5)
        assert "clipped at 1.5" in event.message


def test_monitor_without_recorder_keeps_history_and_honours_every():
    monitor = PerSampleMonitor(quantiles=(0.5,), every=2)
    for step in range(5):
        monitor.observe(step, PerSampleNorms(torch.full((4, 1), float(step))))
    events = monitor.flush()
    assert [e.step for e in events] == [0, 2, 4]
    assert [e.data["quantiles"]["0.5"] for e in events] == [0.0, 2.0, 4.0]
    assert events[0].data["fraction_clipped"] is None  # no clip norm given
    assert monitor.history == events


class TestModelsThatCannotBeWrapped:
    def bn_model(self) -> nn.Module:
        return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 1))

    def test_opacus_reason_and_the_layer_name(self):
        pytest.importorskip("opacus")
        with pytest.raises(PrivacyModelError) as info:
            check_model(self.bn_model())
        text = str(info.value)
        assert "'1' (BatchNorm1d)" in text
        assert (
            "ShouldReplaceModuleError: BatchNorm cannot support training with differential" in text
        )
        assert "ModuleValidator.fix(model)" in text
        assert info.value.problems[0].name == "1"
        assert text.startswith("model:")

    def test_wrap_model_and_make_private_get_the_same_error(self):
        opacus = pytest.importorskip("opacus")
        with pytest.raises(PrivacyModelError, match=r"'1' \(BatchNorm1d\)"):
            wrap_model(self.bn_model())
        model = self.bn_model()
        loader = torch.utils.data.DataLoader(
            torch.utils.data.TensorDataset(torch.randn(8, 3), torch.randn(8, 1)), batch_size=4
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with pytest.raises(PrivacyModelError, match=r"'1' \(BatchNorm1d\)"):
                opacus.PrivacyEngine().make_private(
                    module=check_model(model),
                    optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                    data_loader=loader,
                    noise_multiplier=1.0,
                    max_grad_norm=1.0,
                )

    def test_a_nested_layer_is_named_by_its_path_and_eval_mode_is_named(self):
        pytest.importorskip("opacus")
        model = nn.Sequential(nn.Linear(3, 4), nn.Sequential(nn.Tanh(), nn.LSTM(4, 4)))
        with pytest.raises(PrivacyModelError, match=r"'1\.1' \(LSTM\)"):
            check_model(model)
        with pytest.raises(PrivacyModelError, match="training mode"):
            check_model(nn.Linear(2, 2).eval())

    def test_functional_path_names_the_batchnorm_without_opacus(self):
        model = self.bn_model()
        with pytest.raises(PrivacyModelError, match=r"'1' \(BatchNorm1d\).*batch"):
            check_model(model, opacus=False)
        with pytest.raises(PrivacyModelError, match=r"'1' \(BatchNorm1d\)"):
            from_functional(model, nn.MSELoss(), torch.randn(4, 3), torch.randn(4, 1))

    def test_a_wrappable_model_passes_unchanged(self):
        model = small_model()
        assert check_model(model) is model
        assert check_model(model, opacus=False) is model

    def test_not_a_module(self):
        with pytest.raises(TypeError, match="model"):
            check_model([torch.zeros(1)])


def test_grad_sample_missing_is_explained():
    with pytest.raises(ValueError, match="grad_sample"):
        from_grad_sample(nn.Linear(2, 2))


def test_norms_of_checks_the_example_counts():
    with pytest.raises(ValueError, match=r"per_sample_grads\[1\]"):
        norms_of([torch.zeros(3, 2), torch.zeros(4)])


def test_per_sample_events_ride_a_guards_recorder_in_a_training_loop(tmp_path):
    # no Opacus: torch.func norms each step, recorded next to the guard's own steps
    model = small_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    guard = gg.Guard(model, gg.ClipNorm(1.0), store=tmp_path / "run", log_every=5, health=False)
    monitor = PerSampleMonitor(guard.recorder, quantiles=(0.5,))
    loss_fn = nn.CrossEntropyLoss()
    medians = []
    for step in range(10):
        x, y = batch(16)
        norms = from_functional(model, loss_fn, x, y)
        medians.append(np.median(norms.total.numpy()))
        monitor.observe(step, norms, clip_norm=1.0)
        optimizer.zero_grad()
        loss_fn(model(x), y).backward()
        guard.step(optimizer)
    guard.close()
    store = gg.RunStore.open(tmp_path / "run")
    assert len(store.steps()["step"]) == 10
    events = store.events(kind="per_sample")
    assert [e.step for e in events] == list(range(10))
    got = [e.data["quantiles"]["0.5"] for e in events]
    np.testing.assert_allclose(got, medians, rtol=1e-5)


def test_importing_the_privacy_package_does_not_import_opacus():
    import subprocess
    import sys

    code = (
        "import sys, gradguard, gradguard.privacy, gradguard.policies.noise; "
        "print('opacus' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert out.stdout.strip() == "False"
