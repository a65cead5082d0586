"""A byte-level LSTM language model trained with plain SGD (after Zaremba et al. 2014).

Zaremba, Sutskever and Vinyals trained LSTM language models with SGD at learning rate
1 and clipped the gradient norm at 5, the origin of the "5–10 for RNNs" folklore. Here
one LSTM layer (embedding 32, 128 units) reads random 64-byte windows of the standard
library's source (:mod:`benchmarks.efficacy.text`); the metric is the held-out
cross-entropy (nats per byte) at the end.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from . import loop, text
from .policies import PolicyFactory


@dataclass(frozen=True)
class LSTMConfig:
    """The LSTM task and its training set-up."""

    name: str = "SGD"
    embed: int = 32
    hidden: int = 128
    context: int = 64
    batch: int = 16
    steps: int = 400
    lr: float = 1.0
    momentum: float = 0.0
    eval_batch: int = 64

    def lost(self, result: loop.Result) -> bool:
        """Diverged, or a held-out loss above the bytes' unigram entropy (learned nothing)."""
        return result.diverged or not result.final < text.unigram_entropy()

    @property
    def label(self) -> str:
        momentum = f" momentum {self.momentum:g}" if self.momentum else ""
        return f"byte LSTM, SGD lr {self.lr:g}{momentum}"


class ByteLSTM(nn.Module):
    """Byte embedding → one LSTM layer → next-byte logits."""

    def __init__(self, config: LSTMConfig) -> None:
        super().__init__()
        self.embed = nn.Embedding(text.VOCAB, config.embed)
        self.lstm = nn.LSTM(config.embed, config.hidden, batch_first=True)
        self.head = nn.Linear(config.hidden, text.VOCAB)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        states, _ = self.lstm(self.embed(tokens))
        return self.head(states)


def train(
    config: LSTMConfig, name: str, factory: PolicyFactory, seed: int, rewind: dict | None = None
) -> loop.Result:
    """Train one seed under one policy; windows and weights depend on the seed only."""
    train_bytes = text.corpus()[0]
    torch.manual_seed(seed)
    model = ByteLSTM(config)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum)
    data = torch.Generator().manual_seed(6000 + seed)

    def forward(step: int):
        window = text.windows(train_bytes, config.batch, config.context, data)
        logits = model(window[:, :-1])
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), window[:, 1:].flatten())
        return loss, loss.detach(), True

    trace = loop.run(loop.Setup(model, optimizer), factory(), config.steps, forward, rewind=rewind)
    final = text.held_out_loss(model, config.eval_batch, config.context)
    return loop.result(trace, name, seed, final)
