"""The health rules on small real training runs (CPU, a few seconds in all)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import gradguard
from gradguard.health import (
    BackwardOrder,
    HealthConfig,
    HealthMonitor,
    Kind,
    Severity,
    diagnose,
    find_nonfinite_forward,
    infer_family,
    recommend_threshold,
)
from gradguard.schema import HostBatch


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # tiny models: intra-op threads only add contention on a shared machine (~10× slower)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class Recorder:
    """Collects per-step host numbers the way a log interval would, for the tests."""

    def __init__(self, monitor: HealthMonitor, every: int = 50, snapshot_every: int = 1):
        self.monitor, self.every, self.snapshot_every = monitor, every, snapshot_every
        self.findings: list = []
        self.all_norms: list[float] = []
        self._reset()

    def _reset(self):
        self.steps, self.cols = [], {"total_norm": [], "threshold": [], "loss": []}
        self.tensor_steps, self.tensor_norms = [], []

    def record(self, step, names, total, norms, loss, threshold=math.inf):
        self.steps.append(step)
        self.cols["total_norm"].append(total)
        self.cols["threshold"].append(threshold)
        self.cols["loss"].append(loss)
        self.all_norms.append(total)
        if step % self.snapshot_every == 0:
            self.tensor_steps.append(step)
            self.tensor_norms.append(list(norms))
        self.names = tuple(names)
        if len(self.steps) == self.every:
            self.flush()

    def flush(self):
        if self.steps:
            batch = HostBatch(
                self.steps, self.cols, self.names, self.tensor_steps, self.tensor_norms
            )
            self.findings += self.monitor.update(batch)
        self._reset()


def kinds(findings):
    return {f.kind for f in findings}


# ---------------------------------------------------------------- vanishing (sigmoid)


def deep_mlp(activation, depth=10, width=16):
    layers = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), activation()]
    return nn.Sequential(*layers, nn.Linear(width, 1))


def train_layer_view(model, steps=4):
    torch.manual_seed(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    recorder = Recorder(HealthMonitor(HealthConfig(group_by_module=False)), every=steps)
    x, y = torch.randn(64, 16), torch.randn(64, 1)
    for step in range(steps):
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        stats = gradguard.measure(model)
        layers = stats.by_module()
        recorder.record(
            step, layers.names, stats.total_norm.item(), layers.norms.tolist(), loss.item()
        )
        opt.step()
    recorder.flush()
    return recorder.findings


def test_deep_sigmoid_mlp_flags_vanishing_early_layers():
    torch.manual_seed(0)
    findings = train_layer_view(deep_mlp(nn.Sigmoid))
    vanishing = [f for f in findings if f.kind is Kind.VANISHING_LAYER]
    assert len(vanishing) == 1
    flagged = vanishing[0].params
    assert "0" in flagged and "2" in flagged  # the first Linear layers
    assert "20" not in flagged  # the output layer still learns
    assert any("ReLU" in a for a in vanishing[0].advice)
    assert Kind.VANISHING not in kinds(findings)  # the total norm alone looks fine


def test_relu_mlp_of_same_depth_does_not_vanish():
    torch.manual_seed(0)
    findings = train_layer_view(deep_mlp(nn.ReLU))
    assert Kind.VANISHING_LAYER not in kinds(findings)


# ----------------------------------------------------------------- exploding (tanh RNN)


class Sequence2One(nn.Module):
    def __init__(self, recurrent_scale):
        super().__init__()
        self.rnn = nn.RNN(4, 32, batch_first=True, nonlinearity="tanh")
        self.head = nn.Linear(32, 1)
        with torch.no_grad():
            q, _ = torch.linalg.qr(torch.randn(32, 32))
            self.rnn.weight_hh_l0.copy_(q * recurrent_scale)

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


def train_rnn(scale, steps=12):
    torch.manual_seed(0)
    model = Sequence2One(scale)
    monitor = HealthMonitor(HealthConfig.for_model(model))
    recorder = Recorder(monitor, every=6)
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    for step in range(steps):
        x = 0.1 * torch.randn(16, 50, 4)
        loss = nn.functional.mse_loss(model(x), torch.ones(16, 1))
        opt.zero_grad()
        loss.backward()
        host = gradguard.measure(model).to_host()
        recorder.record(step, host.names, host.total_norm, host.norms, loss.item())
        opt.step()
    recorder.flush()
    return model, recorder.findings


def test_tanh_rnn_with_large_recurrent_weights_flags_exploding():
    model, findings = train_rnn(2.0)
    assert infer_family(model) == "rnn"
    exploding = [f for f in findings if f.kind is Kind.EXPLODING]
    assert len(exploding) == 1
    assert exploding[0].evidence["total_norm"] > HealthConfig(family="rnn").explode_above
    assert any("RNN" in a for a in exploding[0].advice)


def test_tanh_rnn_with_contracting_weights_does_not_explode():
    _, findings = train_rnn(0.5)
    assert Kind.EXPLODING not in kinds(findings)


# ---------------------------------------------------------------- non-finite origin


class Trapped(nn.Module):
    """Six tanh layers; after l3, ``where(h > 0, sqrt(h), 0)``: finite forward, NaN backward."""

    def __init__(self):
        super().__init__()
        for i in range(6):
            self.add_module(f"l{i}", nn.Linear(8, 8))

    def forward(self, x):
        for i in range(6):
            x = getattr(self, f"l{i}")(x)
            if i == 3:
                x = torch.where(x > 0, x.sqrt(), torch.zeros_like(x))
            elif i < 5:
                x = torch.tanh(x)
        return x


def test_backward_order_locates_the_nan_origin():
    torch.manual_seed(0)
    model = Trapped()
    order = BackwardOrder(model)
    assert order.attached and not order.learned
    x = torch.randn(32, 8)
    out = model(x)
    assert torch.isfinite(out).all()  # the forward pass looks healthy
    out.square().mean().backward()
    assert not order.attached  # hooks gone after the first full backward
    assert order.order[0].startswith("l5.")

    stats = gradguard.measure(model)
    bad = stats.nonfinite_names()
    upstream = [f"l{i}.{p}" for i in range(4) for p in ("weight", "bias")]
    assert sorted(bad) == sorted(upstream)  # the NaN reached everything upstream...
    assert bad[0].startswith("l0.")  # ...so registration order blames the first layer
    origin = order.first_nonfinite(bad)
    assert origin is not None and origin.startswith("l3.")
    assert order.first_nonfinite(stats.nonfinite) == origin
    assert order.first_nonfinite([]) is None

    host = stats.to_host()
    batch = HostBatch([0], {"total_norm": [host.total_norm]}, host.names, [0], [host.norms])
    (finding,) = HealthMonitor(order=order).update(batch)
    assert finding.kind is Kind.NONFINITE and finding.severity is Severity.CRITICAL
    assert finding.params[0] == origin
    assert finding.evidence["nonfinite_tensors"] == 8


def test_backward_order_validates_flags():
    model = nn.Linear(2, 2)
    order = BackwardOrder(model)
    model(torch.ones(1, 2)).sum().backward()
    with pytest.raises(ValueError, match="names_or_flags"):
        order.first_nonfinite([True])
    assert order.first_nonfinite([False, True]) == "bias"


class LogLayer(nn.Module):
    def forward(self, x):
        return torch.log(x)


def test_find_nonfinite_forward_names_first_bad_module():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), LogLayer(), nn.Linear(4, 2))
    x = torch.randn(8, 4)
    assert find_nonfinite_forward(model, x) == "2"
    assert find_nonfinite_forward(model[:2], x) is None
    assert find_nonfinite_forward(model, torch.full((1, 4), math.nan)) == "<input>"


# ------------------------------------------------------------ healthy small transformer


class CopyTransformer(nn.Module):
    def __init__(self, vocab=10, d_model=32):
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        layer = nn.TransformerEncoderLayer(d_model, 4, 64, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, vocab)

    def forward(self, x):
        return self.head(self.encoder(self.embed(x)))


@pytest.fixture(scope="module")
def transformer_run():
    torch.manual_seed(0)
    model = CopyTransformer()
    config = HealthConfig.for_model(model)
    threshold = config.family_row.clip_start
    recorder = Recorder(HealthMonitor(config), every=50, snapshot_every=25)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for step in range(500):
        x = torch.randint(0, 10, (16, 16))
        loss = nn.functional.cross_entropy(model(x).reshape(-1, 10), x.reshape(-1))
        opt.zero_grad()
        loss.backward()
        stats = gradguard.measure(model)
        gradguard.clip_grads_with_norm_(model.parameters(), threshold, stats.total_norm)
        host = stats.to_host()
        recorder.record(step, host.names, host.total_norm, host.norms, loss.item(), threshold)
        losses.append(loss.item())
        opt.step()
    recorder.flush()
    return model, config, recorder, losses


def test_healthy_transformer_raises_no_warnings(transformer_run):
    _, config, recorder, losses = transformer_run
    assert config.family == "transformer"
    assert np.mean(losses[-20:]) < 0.5 * np.mean(losses[:20])  # it does learn
    serious = [f for f in recorder.findings if f.severity.rank >= Severity.WARNING.rank]
    assert serious == []


def test_recommended_threshold_on_recorded_run_is_in_band(transformer_run):
    norms = np.asarray(transformer_run[2].all_norms[300:])  # past the early transient
    advice = recommend_threshold(norms)
    assert not advice.capped
    assert 95.0 <= advice.percentile <= 100.0
    assert advice.expected_clip_rate <= 0.05
    assert np.percentile(norms, 95) <= advice.threshold <= 1.1 * np.percentile(norms, 95)
    assert advice.median <= advice.threshold <= 10 * advice.median


def test_threshold_far_above_norms_means_clipping_never_acts():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(128, 8), torch.randn(128, 1)
    norms, thresholds, clipped = [], [], []
    for _ in range(150):
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        total = gradguard.clip_grad_norm_(model.parameters(), max_norm=100.0).item()
        norms.append(total)
        thresholds.append(100.0)
        clipped.append(float(total > 100.0))
        opt.step()
    columns = {"total_norm": norms, "threshold": thresholds, "clipped": clipped}
    findings = diagnose(columns, range(150))
    inactive = [f for f in findings if f.kind is Kind.CLIP_INACTIVE]
    assert len(inactive) == 1
    assert inactive[0].evidence["recommended_threshold"] < 0.3 * 100.0
    # the same norms under a threshold that fits them: silent
    fitted = recommend_threshold(norms).threshold
    assert diagnose({**columns, "threshold": [fitted] * 150}, range(150)) == []
