"""Loss-spike recovery: a small causal transformer learning a synthetic language.

The language is a random second-order Markov chain over ``vocab`` tokens (each pair
of previous tokens picks a sparse Dirichlet distribution of the next one), so the
loss falls smoothly towards a known floor, the chain's entropy rate. AdamW trains a
two-layer pre-LN transformer on fresh samples each step.

Two ways to cause spikes:

* ``bad_batches``: at a few steps the batch is replaced by uniform random tokens and
  its loss is multiplied by ``bad_scale`` (a data or loss-weighting bug), which makes
  the gradient norm some hundreds of times its usual size;
* a learning rate high enough, with no warm-up, that the run spikes on its own.

*Steps lost* compares a run with a reference run of the same seed (no clipping, the
base learning rate, no bad batches): with ``L`` the run's final loss, it is the number
of steps the reference still had to train after it first reached ``L`` (0 when the run
ends at or below the reference's final loss; every step when the run diverged). The
*final loss* is the mean loss of the last 50 clean batches (fresh samples, so
held-out), reported as excess over the entropy floor, so 0 is perfect.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from . import loop
from .policies import PolicyFactory


@dataclass(frozen=True)
class LMConfig:
    """One spike scenario and its training set-up."""

    name: str = "bad batches"
    vocab: int = 16
    context: int = 32
    width: int = 64
    layers: int = 2
    heads: int = 4
    batch: int = 32
    steps: int = 400
    lr: float = 3e-3
    bad_batches: tuple[int, ...] = (150, 151, 152, 250)
    bad_scale: float = 1000.0
    concentration: float = 0.1  # Dirichlet concentration: smaller is a sparser chain
    norm_first: bool = True  # pre-LN blocks (False: the original post-LN)

    @property
    def label(self) -> str:
        return self.name

    def lost(self, result: loop.Result) -> bool:
        """Diverged, or an excess loss above 1 nat (unclipped Adam after bad batches: ~1.9)."""
        return result.diverged or not result.excess < 1.0


class MarkovChain:
    """A random second-order Markov chain: sampler and entropy rate."""

    def __init__(self, vocab: int, concentration: float, gen: torch.Generator) -> None:
        alpha = torch.full((vocab,), concentration)
        gamma = torch._standard_gamma(alpha.expand(vocab * vocab, vocab).contiguous(), gen)
        self.vocab = vocab
        self.probs = gamma / gamma.sum(-1, keepdim=True)
        self.entropy = self._entropy_rate(gen)

    def sample(self, n: int, length: int, gen: torch.Generator) -> torch.Tensor:
        tokens = torch.empty(n, length, dtype=torch.long)
        tokens[:, :2] = torch.randint(0, self.vocab, (n, 2), generator=gen)
        for t in range(2, length):
            state = tokens[:, t - 2] * self.vocab + tokens[:, t - 1]
            tokens[:, t] = torch.multinomial(self.probs[state], 1, generator=gen).squeeze(1)
        return tokens

    def _entropy_rate(self, gen: torch.Generator) -> float:
        # Conditional entropy per state, weighted by the empirical state frequencies.
        sample = self.sample(256, 256, gen)[:, 2:]
        state = (sample[:, :-1] * self.vocab + sample[:, 1:]).flatten()
        weights = torch.bincount(state, minlength=self.vocab**2).float()
        p = self.probs
        per_state = -(p * p.clamp_min(1e-30).log()).sum(-1)
        return float((weights * per_state).sum() / weights.sum())


class TinyLM(nn.Module):
    """Token and position embeddings, pre-LN transformer blocks, a tied-free head."""

    def __init__(self, config: LMConfig) -> None:
        super().__init__()
        self.tokens = nn.Embedding(config.vocab, config.width)
        self.positions = nn.Embedding(config.context, config.width)
        block = nn.TransformerEncoderLayer(
            config.width,
            config.heads,
            4 * config.width,
            dropout=0.0,
            batch_first=True,
            norm_first=config.norm_first,
        )
        self.blocks = nn.TransformerEncoder(block, config.layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(config.width)
        self.head = nn.Linear(config.width, config.vocab)
        mask = nn.Transformer.generate_square_subsequent_mask(config.context - 1)
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        n = tokens.shape[1]
        h = self.tokens(tokens) + self.positions.weight[:n]
        h = self.blocks(h, mask=self.mask[:n, :n], is_causal=True)
        return self.head(self.norm(h))


def smooth(losses: list[float], beta: float = 0.95) -> list[float]:
    """Exponential moving average of a loss curve (bias-corrected)."""
    out, ema = [], 0.0
    for i, value in enumerate(losses, 1):
        ema = beta * ema + (1 - beta) * value
        out.append(ema / (1 - beta**i))
    return out


def steps_lost(result: loop.Result, reference: loop.Result) -> int:
    """Steps the reference still trained after first reaching ``result``'s final loss."""
    total = len(reference.curve)
    if result.diverged or not math.isfinite(result.final):
        return total
    for step, value in enumerate(smooth(reference.curve)):
        if value <= result.final:
            return max(total - 1 - step, 0)
    return 0


def train(
    config: LMConfig, name: str, factory: PolicyFactory, seed: int, rewind: dict | None = None
) -> loop.Result:
    """Train one seed under one policy; the chain, data and weights depend on the seed only.

    ``final`` is the mean loss of the last 50 clean batches; ``floor`` the chain's
    entropy rate.
    """
    data = torch.Generator().manual_seed(2000 + seed)
    chain = MarkovChain(config.vocab, config.concentration, data)
    torch.manual_seed(seed)
    model = TinyLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.01)
    bad = set(config.bad_batches)

    def forward(step: int):
        tokens = chain.sample(config.batch, config.context, data)
        scale = 1.0
        if step in bad:
            tokens = torch.randint(0, config.vocab, tokens.shape, generator=data)
            scale = config.bad_scale
        logits = model(tokens[:, :-1])
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        return loss * scale, loss.detach(), step not in bad

    trace = loop.run(loop.Setup(model, optimizer), factory(), config.steps, forward, rewind=rewind)
    tail = trace.curve[-50:]
    final = sum(tail) / len(tail) if tail else math.nan
    return loop.result(trace, name, seed, final, floor=chain.entropy)
