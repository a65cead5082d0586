"""The corpus's model families on offline data: each task builds a small model, its batches
and its loss. Sizes are chosen so a few hundred steps take a few seconds on one core.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from . import data


@dataclass
class Task:
    """A model with its data and loss."""

    model: nn.Module
    batch: Callable[[torch.Generator, int], tuple[Tensor, Tensor]]  # (gen, size) -> (x, y)
    loss: Callable[[Tensor, Tensor], Tensor]  # (model output, y) -> scalar


def _classify(output: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(output.float(), y)


def _naive_classify(output: Tensor, y: Tensor) -> Tensor:
    """Cross-entropy written by hand, as ``-log(softmax)``: a probability that underflows
    to 0 makes it inf (``F.cross_entropy`` would stay finite)."""
    probs = torch.softmax(output.float(), dim=-1)
    return -torch.log(probs.gather(1, y.unsqueeze(1))).mean()


def _regress(output: Tensor, y: Tensor) -> Tensor:
    return F.mse_loss(output.float(), y)


def _next_byte(output: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(output.float().reshape(-1, output.shape[-1]), y.reshape(-1))


class MLP(nn.Sequential):
    """Linear layers with an activation between them (``body.<i>`` then ``head``)."""

    def __init__(self, sizes: list[int], activation: type[nn.Module] = nn.ReLU) -> None:
        layers: list[nn.Module] = []
        for a, b in itertools.pairwise(sizes[:-1]):
            layers += [nn.Linear(a, b), activation()]
        super().__init__(*layers, nn.Linear(sizes[-2], sizes[-1]))


def mlp(
    table: str = "digits",
    width: int = 64,
    depth: int = 2,
    activation: str = "relu",
    naive_loss: bool = False,
    target_scale: float = 1.0,
) -> Task:
    """An MLP on a scikit-learn table (classes: cross-entropy; diabetes: MSE on the
    target × ``target_scale``)."""
    t = data.table(table)
    act = {"relu": nn.ReLU, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh, "gelu": nn.GELU}[activation]
    model = MLP([t.x.shape[1]] + [width] * depth + [t.classes or 1], act)
    if not t.classes:

        def batch(gen: torch.Generator, size: int) -> tuple[Tensor, Tensor]:
            x, y = t.batch(gen, size)
            return x, y * target_scale

        return Task(model, batch, _regress)
    return Task(model, t.batch, _naive_classify if naive_loss else _classify)


class LayerNormMLP(nn.Module):
    """Linear → LayerNorm → ReLU twice, then a head: scaling the input changes nothing in
    fp32, but large inputs overflow fp16 before the norm."""

    def __init__(self, features: int, width: int, classes: int) -> None:
        super().__init__()
        self.inp = nn.Linear(features, width)
        self.norm1 = nn.LayerNorm(width)
        self.hidden = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.head = nn.Linear(width, classes)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.norm1(self.inp(x)))
        return self.head(torch.relu(self.norm2(self.hidden(h))))


def ln_mlp(table: str = "digits", width: int = 64) -> Task:
    t = data.table(table)
    return Task(LayerNormMLP(t.x.shape[1], width, t.classes), t.batch, _classify)


class NormFeature(nn.Module):
    """Appends each row's L2 norm, sqrt(sum h²), whose gradient at an all-zero row is NaN:
    the textbook NaN born in backward (the forward value, 0, is finite)."""

    def forward(self, h: Tensor) -> Tensor:
        return torch.cat([h, torch.sqrt((h * h).sum(-1, keepdim=True))], dim=-1)


class NormMLP(nn.Module):
    """An MLP whose bias-free layers ``inp`` and ``proj`` feed a :class:`NormFeature`: a blank
    (all-zero) sample reaches it as an all-zero row."""

    def __init__(self, features: int, width: int, classes: int) -> None:
        super().__init__()
        self.inp = nn.Linear(features, width, bias=False)
        self.proj = nn.Linear(width, width, bias=False)
        self.norm = NormFeature()
        self.head = nn.Linear(width + 1, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.norm(self.proj(torch.relu(self.inp(x)))))


def norm_mlp(table: str = "digits", width: int = 32) -> Task:
    t = data.table(table)
    return Task(NormMLP(t.x.shape[1], width, t.classes), t.batch, _classify)


class CNN(nn.Module):
    def __init__(self, channels: int = 8) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, 2 * channels, 3, padding=1)
        self.head = nn.Linear(2 * channels * 16, 10)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.conv1(x))
        h = F.max_pool2d(torch.relu(self.conv2(h)), 2)
        return self.head(h.flatten(1))


def cnn(channels: int = 8) -> Task:
    """A two-layer CNN on the 8×8 digit images."""
    images, labels = data.digit_images(), data.table("digits").y

    def batch(gen: torch.Generator, size: int) -> tuple[Tensor, Tensor]:
        index = torch.randint(0, images.shape[0], (size,), generator=gen)
        return images[index], labels[index]

    return Task(CNN(channels), batch, _classify)


class RowLSTM(nn.Module):
    """An LSTM reading a digit image row by row (8 steps of 8 pixels)."""

    def __init__(self, hidden: int = 32) -> None:
        super().__init__()
        self.rnn = nn.LSTM(8, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 10)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.rnn(x.squeeze(1))
        return self.head(out[:, -1])


def lstm(hidden: int = 32) -> Task:
    task = cnn()
    return Task(RowLSTM(hidden), task.batch, _classify)


class AdditionRNN(nn.Module):
    """A vanilla tanh RNN on Pascanu et al.'s addition problem (the classic explosion)."""

    def __init__(self, hidden: int = 32, gain: float = 1.0) -> None:
        super().__init__()
        self.rnn = nn.RNN(2, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 1)
        with torch.no_grad():
            self.rnn.weight_hh_l0.copy_(nn.init.orthogonal_(torch.empty(hidden, hidden)) * gain)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


def addition_rnn(length: int = 40, hidden: int = 32, gain: float = 1.0) -> Task:
    def batch(gen: torch.Generator, size: int) -> tuple[Tensor, Tensor]:
        values = torch.rand(size, length, generator=gen)
        first = torch.randint(0, max(1, length // 10), (size,), generator=gen)
        second = torch.randint(max(1, length // 10), length // 2, (size,), generator=gen)
        marks = torch.zeros(size, length)
        rows = torch.arange(size)
        marks[rows, first] = 1.0
        marks[rows, second] = 1.0
        target = (values[rows, first] + values[rows, second]).unsqueeze(1)
        return torch.stack([values, marks], dim=-1), target

    return Task(AdditionRNN(hidden, gain), batch, _regress)


class ByteGRU(nn.Module):
    def __init__(self, hidden: int = 64) -> None:
        super().__init__()
        self.embed = nn.Embedding(256, 16)
        self.rnn = nn.GRU(16, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 256)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.rnn(self.embed(x))
        return self.head(out)


def gru_lm(hidden: int = 64, length: int = 32) -> Task:
    """A byte-level GRU language model on the standard library's source."""
    return Task(ByteGRU(hidden), lambda g, n: data.text_batch(g, n, length), _next_byte)


class TinyGPT(nn.Module):
    """A causal transformer over bytes: embedding, pre-norm encoder layers, tied-free head."""

    def __init__(self, width: int = 32, layers: int = 2, heads: int = 2, length: int = 32) -> None:
        super().__init__()
        self.embed = nn.Embedding(256, width)
        self.position = nn.Parameter(torch.randn(length, width) * 0.02)
        layer = nn.TransformerEncoderLayer(
            width, heads, 2 * width, dropout=0.0, batch_first=True, norm_first=True
        )
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, 256)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(length))

    def forward(self, x: Tensor) -> Tensor:
        h = self.embed(x) + self.position[: x.shape[1]]
        h = self.blocks(h, mask=self.mask[: x.shape[1], : x.shape[1]], is_causal=True)
        return self.head(self.norm(h))


def transformer_lm(width: int = 32, layers: int = 2, length: int = 32) -> Task:
    """A tiny GPT-style byte language model on the standard library's source."""
    model = TinyGPT(width, layers, 2, length)
    return Task(model, lambda g, n: data.text_batch(g, n, length), _next_byte)


class HashedBigrams(nn.Module):
    """Embedding-heavy next-byte model: a large table of hashed (previous two bytes) rows."""

    def __init__(self, rows: int = 8192, width: int = 16) -> None:
        super().__init__()
        self.rows = rows
        self.table = nn.Embedding(rows, width)
        self.unigram = nn.Embedding(256, width)
        self.head = nn.Linear(width, 256)

    def forward(self, x: Tensor) -> Tensor:
        prev = F.pad(x, (1, 0))[:, :-1]
        index = (x * 257 + prev * 65_537) % self.rows
        return self.head(torch.tanh(self.table(index) + self.unigram(x)))


def embedding_lm(rows: int = 8192, width: int = 16, length: int = 32) -> Task:
    """A hashed-bigram embedding model (recommendation-style: >90% of parameters in tables)."""
    return Task(HashedBigrams(rows, width), lambda g, n: data.text_batch(g, n, length), _next_byte)


TASKS: dict[str, Callable[..., Task]] = {
    "mlp": mlp,
    "norm_mlp": norm_mlp,
    "ln_mlp": ln_mlp,
    "cnn": cnn,
    "lstm": lstm,
    "addition_rnn": addition_rnn,
    "gru_lm": gru_lm,
    "transformer_lm": transformer_lm,
    "embedding_lm": embedding_lm,
}
