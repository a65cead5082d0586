"""check_model: every layer that mixes examples in training mode is named with its reason
and fix, by Opacus's validators, by type and by the independence probe; the model is left
as it was."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from gradguard.privacy import PrivacyModelError, check_model, wrap_model
from tests.privacy.runs import small_model

torch.set_num_threads(1)


class Centre(nn.Module):
    """A custom layer that subtracts the batch mean: no type check knows it."""

    def forward(self, x):
        return x - x.mean(0, keepdim=True)


class RunningMean(nn.Module):
    """A per-example layer (identity) that keeps a running mean of its batches."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.register_buffer("average", torch.zeros(width))

    def forward(self, x):
        if self.training:
            self.average.mul_(0.9).add_(0.1 * x.detach().mean(0))
        return x


def problems(model, *args, **kwargs):
    with pytest.raises(PrivacyModelError) as info:
        check_model(model, *args, **kwargs)
    return info.value.problems


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
            check_model(model, probe=False)
        with pytest.raises(PrivacyModelError, match="training mode"):
            check_model(nn.Linear(2, 2).eval())

    def test_functional_path_names_the_batchnorm_without_opacus(self):
        model = self.bn_model()
        with pytest.raises(PrivacyModelError, match=r"'1' \(BatchNorm1d\).*batch"):
            check_model(model, opacus=False)

    def test_a_wrappable_model_passes_unchanged(self):
        model = small_model()
        assert check_model(model) is model
        assert check_model(model, opacus=False) is model

    def test_not_a_module(self):
        with pytest.raises(TypeError, match="model"):
            check_model([torch.zeros(1)])


@pytest.mark.parametrize("opacus", [True, False])
def test_batchnorm_without_affine_is_flagged_although_opacus_passes_it(opacus):
    if opacus:
        validators = pytest.importorskip("opacus.validators")
        bn = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6, affine=False), nn.Linear(6, 2))
        assert validators.ModuleValidator.validate(bn, strict=False) == []  # Opacus's gap
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6, affine=False), nn.Linear(6, 2))
    (problem,) = problems(model, opacus=opacus)
    assert (problem.name, problem.module) == ("1", "BatchNorm1d")
    assert "with or without affine parameters" in problem.reason
    assert "GroupNorm or LayerNorm" in problem.fix


def test_every_batchnorm_and_running_statistics_in_a_conv_net_are_named():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4, affine=False, track_running_stats=False),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3),
        nn.InstanceNorm2d(4, track_running_stats=True),
    )
    found = {(p.name, p.module): p for p in problems(model, opacus=False)}
    assert set(found) == {("1", "BatchNorm2d"), ("4", "InstanceNorm2d")}
    assert "running statistics" in found[("4", "InstanceNorm2d")].reason
    assert "track_running_stats=False" in found[("4", "InstanceNorm2d")].fix


def test_a_custom_layer_that_mixes_examples_is_found_by_the_probe():
    model = nn.Sequential(nn.Linear(4, 6), nn.Sequential(nn.Tanh(), Centre()), nn.Linear(6, 2))
    (problem,) = problems(model)
    assert (problem.name, problem.module) == ("1.1", "Centre")
    assert "changing one example moved the others' outputs" in problem.reason
    assert "GroupNorm or LayerNorm" in problem.fix
    assert check_model(model, probe=False) is model  # types alone cannot know it


def test_a_custom_layer_that_keeps_batch_statistics_is_found_by_the_probe():
    model = nn.Sequential(nn.Linear(4, 6), RunningMean(6), nn.Dropout(0.5), nn.Linear(6, 2))
    (problem,) = problems(model)
    assert (problem.name, problem.module) == ("1", "RunningMean")
    assert "writes buffer 'average' from the batch" in problem.reason


def test_the_model_is_left_as_it_was():
    model = nn.Sequential(
        nn.Linear(4, 6), RunningMean(6), nn.Dropout(0.5), Centre(), nn.Linear(6, 2)
    )
    model.eval()
    model[2].train()  # mixed modes survive
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    problems(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert [m.training for m in model.modules()] == [False, False, False, True, False, False]
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(p.grad is None for p in model.parameters())


class TestProbeInput:
    def test_given_input_is_used_for_models_whose_input_cannot_be_inferred(self):
        class TwoInputs(nn.Module):
            def __init__(self):
                super().__init__()
                self.mix = Centre()

            def forward(self, x, scale):
                return self.mix(x * scale)

        with pytest.warns(RuntimeWarning, match="pass example_input="):
            assert check_model(TwoInputs(), opacus=False) is not None
        (problem,) = problems(TwoInputs(), (torch.randn(5, 3), torch.rand(5, 1)), opacus=False)
        assert problem.name == "mix"
        (problem,) = problems(TwoInputs(), {"x": torch.randn(5, 3), "scale": 2.0}, opacus=False)
        assert problem.name == "mix"

    def test_an_input_the_model_cannot_run_is_named(self):
        model = nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 2))
        with pytest.raises(ValueError, match="example_input: the model's forward failed"):
            check_model(model, torch.randn(5, 3))
        with pytest.raises(ValueError, match="example_input: the probe needs at least 2"):
            check_model(model, torch.randn(1, 4))
        with pytest.raises(TypeError, match="example_input"):
            check_model(model, "a batch")
        with pytest.raises(TypeError, match="probe"):
            check_model(model, probe="no")

    def test_lazy_parameters_are_not_initialised_by_the_probe(self):
        model = nn.Sequential(nn.LazyLinear(3), Centre())
        with pytest.warns(RuntimeWarning, match="lazy"):
            check_model(model, torch.randn(4, 5), opacus=False)
        assert nn.parameter.is_lazy(model[0].weight)

    def test_an_inferred_input_the_model_cannot_run_warns(self):
        model = nn.Sequential(nn.Linear(4, 6), nn.Unflatten(1, (2, 3)), nn.Linear(6, 2))
        with pytest.warns(RuntimeWarning, match="probe could not run on an inferred batch"):
            check_model(model, opacus=False)


def test_models_that_keep_examples_apart_pass_without_a_warning():
    torch.manual_seed(0)
    models = [
        small_model(),
        nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2),
            nn.GroupNorm(4, 8),
            nn.ReLU(),
            nn.Dropout2d(0.2),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(8, 3),
        ),
        nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, dropout=0.1, batch_first=True),
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for model in models:
            assert check_model(model, opacus=False) is model
        tokens = torch.randint(0, 50, (6, 9))
        embed = nn.Sequential(nn.Embedding(50, 8), nn.LSTM(8, 8, batch_first=True))
        assert check_model(embed, tokens, opacus=False) is embed


def test_a_config_built_transformer_passes_with_inferred_and_given_inputs():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    model = transformers.BertForSequenceClassification(config).train()
    tokens = torch.randint(0, 100, (6, 9))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        assert check_model(model, opacus=False) is model
        given = {"input_ids": tokens, "attention_mask": torch.ones_like(tokens)}
        assert check_model(model, given, opacus=False) is model
    # the same model with a custom batch-mixing layer spliced in deep inside is caught
    model.bert.encoder.layer[1].output.LayerNorm = Centre()
    (problem,) = problems(model, given, opacus=False)
    assert (problem.name, problem.module) == ("bert.encoder.layer.1.output.LayerNorm", "Centre")
