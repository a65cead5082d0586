"""``gradguard diagnose``: fresh batches per pass, a sane threshold, clear errors."""

from __future__ import annotations

import math
import textwrap

import pytest

from gradguard import cli
from gradguard.diagnose import ProbeError, load_factory, probe, report

FACTORIES = """
import torch
from torch import nn


def random_batches():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    return model, (torch.randn(16, 4), torch.randn(16, 1)), nn.functional.mse_loss


def one_batch():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    return model, (torch.randn(16, 4), torch.randn(16, 1)), nn.functional.mse_loss


def loader():
    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(40, 4), torch.randn(40, 1))
    batches = torch.utils.data.DataLoader(data, batch_size=8)
    return nn.Linear(4, 1), batches, nn.functional.mse_loss


def function():
    return nn.Linear(4, 1), lambda: (torch.randn(8, 4), torch.randn(8, 1)), nn.functional.mse_loss


class Rnn(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.RNN(2, 32, batch_first=True, nonlinearity="relu")
        self.head = nn.Linear(32, 1)
        with torch.no_grad():
            self.rnn.weight_hh_l0.copy_(torch.eye(32) * 1.5)  # gain 1.5 over 40 steps

    def forward(self, x):
        return self.head(self.rnn(x)[0][:, -1])


def exploding():
    torch.manual_seed(0)
    return Rnn(), lambda: (torch.rand(8, 40, 2), torch.rand(8, 1)), nn.functional.mse_loss


def large_norms():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    return model, lambda: (torch.randn(16, 4), 5 * torch.randn(16, 1)), nn.functional.mse_loss


def raises():
    raise ValueError("the dataset path does not exist")


def bad_loss():
    return nn.Linear(4, 1), (torch.randn(8, 5), torch.randn(8, 1)), nn.functional.mse_loss


def empty():
    return nn.Linear(4, 1), [], nn.functional.mse_loss


def not_a_batch():
    return nn.Linear(4, 1), 42, nn.functional.mse_loss
"""


@pytest.fixture(scope="module")
def factories(tmp_path_factory):
    path = tmp_path_factory.mktemp("factories") / "gg_probe.py"
    path.write_text(textwrap.dedent(FACTORIES))
    return path


def run(factories, name, steps=24):
    return probe(load_factory(f"{factories}:{name}"), steps)


@pytest.mark.parametrize("name", ["random_batches", "loader", "function"])
def test_each_pass_takes_a_fresh_batch(factories, name):
    result = run(factories, name)
    assert result.distinct_batches > 1
    assert len(set(result.total_norms)) > 1
    assert "same batch" not in report(result)


def test_one_fixed_batch_is_named_as_such(factories):
    result = run(factories, "one_batch")
    assert result.distinct_batches == 1
    assert "every pass saw the same batch" in report(result)


def test_a_healthy_model_gets_a_threshold_from_its_norms_within_the_band(factories):
    result = run(factories, "random_batches")
    assert result.exit_code == 0 and result.findings == []
    median = sorted(result.total_norms)[12]
    assert median <= result.threshold <= min(10 * median, 5.0)
    assert "p95 of 24 unclipped norms" in report(result)


def test_the_threshold_never_leaves_the_healthy_band(factories):
    result = run(factories, "large_norms")
    assert max(result.total_norms) > 5.0
    assert result.threshold <= 5.0  # the default family's band tops out at 5


def test_an_exploding_model_gets_no_threshold_but_the_advice_to_fix_it(factories):
    result = run(factories, "exploding")
    assert result.exit_code == 1
    assert {f.kind.value for f in result.findings} & {"exploding", "nonfinite"}
    assert math.isnan(result.threshold)
    text = report(result)
    assert "recommended clip threshold: none — no healthy window found" in text
    assert "lower the learning rate" in text


@pytest.mark.parametrize(
    ("name", "words"),
    [
        ("raises", "the factory raised ValueError: the dataset path does not exist"),
        ("bad_loss", "running the model failed with RuntimeError"),
        ("empty", "the data iterable is empty"),
        ("not_a_batch", "data must be a batch"),
    ],
)
def test_factory_errors_are_one_clear_line_and_exit_2(factories, name, words, capsys):
    with pytest.raises(ProbeError, match=words.split(":")[0]):
        run(factories, name, steps=3)
    assert cli.main(["diagnose", f"{factories}:{name}", "--steps", "3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gradguard: error: ") and words in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_steps_must_be_a_positive_int(factories):
    with pytest.raises(ProbeError, match="steps"):
        probe(load_factory(f"{factories}:random_batches"), 0)
