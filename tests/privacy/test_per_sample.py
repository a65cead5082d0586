"""Per-example norms equal a loop over single examples (torch.func and Opacus); fraction
clipped and quantiles; bad input named."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from gradguard.privacy import (
    PerSampleNorms,
    PrivacyModelError,
    from_functional,
    from_grad_sample,
    norms_of,
    wrap_model,
)
from tests.privacy.runs import batch, small_model

torch.set_num_threads(1)


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


def test_grad_sample_missing_is_explained():
    with pytest.raises(ValueError, match="grad_sample"):
        from_grad_sample(nn.Linear(2, 2))


def test_norms_of_checks_the_example_counts():
    with pytest.raises(ValueError, match=r"per_sample_grads\[1\]"):
        norms_of([torch.zeros(3, 2), torch.zeros(4)])


def test_norms_of_checks_the_names():
    with pytest.raises(ValueError, match="names: 1 names for 2"):
        norms_of([torch.zeros(3, 2), torch.zeros(3)], ["a"])


def test_cat_refuses_parts_of_other_tensors():
    a = PerSampleNorms(torch.ones(2, 2), ("a", "b"))
    with pytest.raises(ValueError, match=r"parts\[1\]"):
        PerSampleNorms.cat([a, PerSampleNorms(torch.ones(2, 3), ("a", "b", "c"))])
    with pytest.raises(ValueError, match="parts"):
        PerSampleNorms.cat([])


def test_functional_norms_refuse_a_batchnorm_in_training_mode_and_bad_batches():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, affine=False), nn.Linear(4, 1))
    with pytest.raises(PrivacyModelError, match=r"'1' \(BatchNorm1d\).*batch"):
        from_functional(model, nn.MSELoss(), torch.randn(4, 3), torch.randn(4, 1))
    model.eval()  # running statistics: each example on its own, as the model is
    assert len(from_functional(model, nn.MSELoss(), torch.randn(4, 3), torch.randn(4, 1))) == 4
    with pytest.raises(ValueError, match="inputs hold 4 examples but targets 3"):
        from_functional(model, nn.MSELoss(), torch.randn(4, 3), torch.randn(3, 1))
    with pytest.raises(ValueError, match="chunk_size"):
        from_functional(model, nn.MSELoss(), torch.randn(4, 3), torch.randn(4, 1), chunk_size=0)


def test_bad_norms_and_sources_are_named():
    with pytest.raises(TypeError, match="layer"):
        PerSampleNorms(torch.ones(4))
    with pytest.raises(TypeError, match="layer"):
        PerSampleNorms(torch.ones(4, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="names: 1 names for 2 tensors"):
        PerSampleNorms(torch.ones(4, 2), ("a",))
    with pytest.raises(TypeError, match="model"):
        from_grad_sample("model")
    with pytest.raises(TypeError, match="loss_fn"):
        from_functional(small_model(), "mse", *batch())
    with pytest.raises(TypeError, match="inputs"):
        from_functional(small_model(), nn.CrossEntropyLoss(), [1.0], batch()[1])
