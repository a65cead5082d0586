"""A byte-level transformer language model on the Python standard library's source.

The model is :class:`benchmarks.efficacy.lm.TinyLM` over 256 byte values; AdamW trains
it on random windows of the training files (:mod:`benchmarks.efficacy.text`), with or
without a linear warm-up of the learning rate. The metric is the mean cross-entropy
(nats per byte) on a fixed held-out set of other modules, at the end of the run.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from . import loop, text
from .lm import TinyLM
from .policies import PolicyFactory


@dataclass(frozen=True)
class ByteLMConfig:
    """One scenario: learning rate, warm-up, precision."""

    name: str = "too-high LR"
    vocab: int = text.VOCAB
    context: int = 64
    width: int = 64
    layers: int = 2
    heads: int = 4
    norm_first: bool = True  # pre-LN blocks (False: post-LN, which needs a warm-up)
    batch: int = 16
    steps: int = 400
    lr: float = 3e-3
    warmup: int = 0  # steps of linear warm-up (0: none)
    autocast: str | None = None  # "bf16" or "fp16" (with a GradScaler)
    eval_batch: int = 64

    def lost(self, result: loop.Result) -> bool:
        """Diverged, or a held-out loss above the bytes' unigram entropy (learned nothing)."""
        return result.diverged or not result.final < text.unigram_entropy()

    @property
    def label(self) -> str:
        warm = f", {self.warmup}-step warm-up" if self.warmup else ", no warm-up"
        cast = f", {self.autocast} autocast" if self.autocast else ""
        return f"byte LM, AdamW lr {self.lr:g}{warm}{cast}"


def _schedule(config: ByteLMConfig):
    if not config.warmup:
        return lambda step: 1.0
    return lambda step: min(1.0, (step + 1) / config.warmup)


def train(
    config: ByteLMConfig,
    name: str,
    factory: PolicyFactory,
    seed: int,
    rewind: dict | None = None,
) -> loop.Result:
    """Train one seed under one policy; windows and weights depend on the seed only."""
    train_bytes = text.corpus()[0]
    torch.manual_seed(seed)
    model = TinyLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(config))
    data = torch.Generator().manual_seed(5000 + seed)

    def forward(step: int):
        window = text.windows(train_bytes, config.batch, config.context, data)
        logits = model(window[:, :-1])
        loss = nn.functional.cross_entropy(logits.flatten(0, 1).float(), window[:, 1:].flatten())
        return loss, loss.detach(), True

    setup = loop.Setup(
        model,
        optimizer,
        schedule,
        autocast=loop.AUTOCAST[config.autocast],
        scaler=config.autocast == "fp16",
    )
    trace = loop.run(setup, factory(), config.steps, forward, rewind=rewind)
    final = text.held_out_loss(model, config.eval_batch, config.context)
    return loop.result(trace, name, seed, final)
