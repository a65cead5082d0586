"""The seeds' two gradient experiments, measured with :func:`gradguard.measure`.

1. Vanishing: gradient norm of the first layer of an MLP (10 units wide, as in the
   seeds) against depth, for sigmoid, tanh and ReLU — with PyTorch's default
   initialisation, and ReLU once more with He initialisation, the seeds' remedy.
2. Exploding: max ``|g|`` of a tanh RNN against sequence length, with the seeds'
   recurrent weights (every entry 2.0) and with an orthogonal matrix of gain 3.

Both run in a few seconds on a CPU and return plain numbers for tables and reports.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .stats import measure

DEPTHS = (5, 10, 20, 30, 50, 100)
LENGTHS = (10, 20, 50, 100, 200)


@dataclass(frozen=True)
class Curve:
    """One line of an experiment: ``values[i]`` measured at ``xs[i]``."""

    label: str
    xs: tuple[int, ...]
    values: tuple[float, ...]


def _he_init(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
            nn.init.zeros_(module.bias)


_ACTIVATIONS: dict[str, tuple[Callable[[], nn.Module], Callable[[nn.Module], None] | None]] = {
    "sigmoid": (nn.Sigmoid, None),
    "tanh": (nn.Tanh, None),
    "relu": (nn.ReLU, None),
    "relu + He init": (nn.ReLU, _he_init),
}


def first_layer_norm_vs_depth(
    depths: Sequence[int] = DEPTHS, width: int = 10, seed: int = 0
) -> list[Curve]:
    """Gradient norm of the first layer's weight after one backward of ``sum(output)``."""
    curves = []
    for label, (activation, init) in _ACTIVATIONS.items():
        values = []
        for depth in depths:
            torch.manual_seed(seed)
            layers: list[nn.Module] = []
            for _ in range(depth):
                layers += [nn.Linear(width, width), activation()]
            model = nn.Sequential(*layers)
            if init is not None:
                init(model)
            model(torch.randn(1, width)).sum().backward()
            values.append(float(measure(model).norms[0]))
        curves.append(Curve(label, tuple(depths), tuple(values)))
    return curves


def max_grad_vs_sequence_length(
    lengths: Sequence[int] = LENGTHS, hidden: int = 10, seed: int = 0
) -> list[Curve]:
    """Max ``|g|`` over a tanh RNN's parameters after one backward of ``sum(outputs)``."""
    setups: dict[str, Callable[[torch.Tensor], object]] = {
        "W_hh filled with 2.0": lambda w: w.fill_(2.0),
        "W_hh orthogonal, gain 3": lambda w: nn.init.orthogonal_(w, gain=3.0),
    }
    curves = []
    for label, set_weights in setups.items():
        values = []
        for length in lengths:
            torch.manual_seed(seed)
            rnn = nn.RNN(5, hidden, batch_first=True)
            with torch.no_grad():
                set_weights(rnn.weight_hh_l0)
            output, _ = rnn(torch.randn(1, length, 5))
            output.sum().backward()
            stats = measure(rnn, max_abs=True)
            assert stats.max_abs is not None
            values.append(float(stats.max_abs.max()))
        curves.append(Curve(label, tuple(lengths), tuple(values)))
    return curves


def format_table(title: str, x_name: str, curves: Sequence[Curve]) -> str:
    """A fixed-width text table, one row per curve."""
    xs = curves[0].xs
    label_width = max(len(c.label) for c in curves) + 2
    lines = [title, f"{x_name:<{label_width}}" + "".join(f"{x:>10}" for x in xs)]
    for curve in curves:
        cells = "".join(f"{v:>10.1e}" for v in curve.values)
        lines.append(f"{curve.label:<{label_width}}{cells}")
    return "\n".join(lines)
