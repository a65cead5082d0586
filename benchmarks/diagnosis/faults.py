"""Faults injected into corpus runs, each with the label a correct diagnosis must match.

A fault acts through hooks the training loop calls (set-up, learning-rate factor, batch,
model output, before the optimizer step) and labels itself: the fault class, the
finding kinds that detect it (``kinds``), the kinds that are true consequences of it
(``also``: they count as correct, not as detections), the step range of the episode and,
where one exists, its origin: ``"forward"`` (the input batch, the forward pass or the
loss made it) or the module the problem starts in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

FORWARD = "forward"


@dataclass(frozen=True)
class Label:
    """What a correct diagnosis says about one fault."""

    fault: str
    kinds: tuple[str, ...]
    start: int
    end: int
    origin: str | None = None
    also: tuple[str, ...] = ()


class Fault:
    """Base: no effect. ``end`` is the run's last step."""

    name = "fault"
    kinds: tuple[str, ...] = ()
    also: tuple[str, ...] = ()

    def label(self, steps: int) -> Label:
        start, end = self.span(steps)
        return Label(self.name, self.kinds, start, end, self.origin(), self.also)

    def span(self, steps: int) -> tuple[int, int]:
        return 0, steps - 1

    def origin(self) -> str | None:
        return None

    def setup(self, model: nn.Module) -> None:
        """Change the model before training."""

    def lr_factor(self, step: int) -> float:
        return 1.0

    def batch(self, step: int, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        return x, y

    def before_step(self, step: int, model: nn.Module) -> None:
        """Act on the model before the forward pass of ``step``."""


# Consequences that follow any fault which wrecks the run.
_WRECK = ("exploding", "loss_divergence", "nonfinite", "run_lost", "spike", "clip_saturated")


@dataclass
class LRTooHigh(Fault):
    """The learning rate is ``factor`` × a healthy one from the first step."""

    factor: float
    name = "lr_too_high"
    kinds = ("exploding", "loss_divergence", "nonfinite", "run_lost", "loss_stall")
    also = ("spike", "clip_saturated", "dead_layer", "vanishing_layer", "layer_ratio")

    def lr_factor(self, step: int) -> float:
        return self.factor


@dataclass
class LRJump(Fault):
    """The learning rate is multiplied by ``factor`` from step ``at`` on."""

    at: int
    factor: float
    name = "lr_jump"
    kinds = ("lr_change",)
    also = (*_WRECK, "loss_stall", "dead_layer", "vanishing_layer", "layer_ratio")

    def span(self, steps: int) -> tuple[int, int]:
        return self.at, steps - 1

    def lr_factor(self, step: int) -> float:
        return self.factor if step >= self.at else 1.0


@dataclass
class CorruptBatch(Fault):
    """The inputs of the batch at step ``at`` are multiplied by ``factor``.

    ``wrecks``: without clipping the one huge update ruins the weights (the run never
    recovers), so the episode lasts to the end and the wreck's findings detect it too.
    """

    at: int
    factor: float = 1000.0
    wrecks: bool = False
    name = "corrupt_batch"

    @property
    def kinds(self) -> tuple[str, ...]:  # type: ignore[override]
        if self.wrecks:
            return ("spike", "exploding", "loss_divergence", "run_lost", "nonfinite")
        return ("spike",)

    @property
    def also(self) -> tuple[str, ...]:  # type: ignore[override]
        return ("dead_layer", "loss_stall", "vanishing_layer", "layer_ratio") if self.wrecks else ()

    def span(self, steps: int) -> tuple[int, int]:
        return self.at, (steps - 1 if self.wrecks else self.at)

    def batch(self, step: int, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        return (x * self.factor, y) if step == self.at else (x, y)


@dataclass
class NonFiniteData(Fault):
    """One value of the input (``where="x"``) or target (``"y"``) is ``value`` at ``at``.

    ``wrecks``: the policy lets it into the weights (Monitor), so every later step is
    non-finite too.
    """

    at: int
    value: float = math.nan
    where: str = "x"
    wrecks: bool = False
    name = "nonfinite_data"
    kinds = ("nonfinite", "run_lost")

    def span(self, steps: int) -> tuple[int, int]:
        return self.at, (steps - 1 if self.wrecks else self.at)

    def origin(self) -> str:
        return FORWARD

    def batch(self, step: int, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        if step != self.at:
            return x, y
        if self.where == "x":
            x = x.clone()
            x.view(-1)[0] = self.value
        else:
            y = y.clone()
            y.view(-1)[0] = self.value
        return x, y


@dataclass
class BackwardNaN(Fault):
    """A blank (all-zero) sample reaches a sqrt(sum h²) feature through bias-free layers for
    ``length`` steps from ``at``: the forward is finite, the gradient of sqrt at 0 is NaN,
    born in backward just above ``layer``."""

    at: int
    length: int = 1
    layer: str = "proj"
    name = "backward_nan"
    kinds = ("nonfinite",)

    def span(self, steps: int) -> tuple[int, int]:
        return self.at, self.at + self.length - 1

    def origin(self) -> str:
        return self.layer

    def batch(self, step: int, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        if self.at <= step < self.at + self.length:
            x = x.clone()
            x[0] = 0.0
        return x, y


@dataclass
class LogOfZero(Fault):
    """Extreme inputs at ``at`` drive class probabilities to exactly 0, and a hand-written
    ``log(softmax(...))`` loss to inf."""

    at: int
    name = "log_of_zero"
    kinds = ("nonfinite",)

    def span(self, steps: int) -> tuple[int, int]:
        return self.at, self.at

    def origin(self) -> str:
        return FORWARD

    def batch(self, step: int, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        if step != self.at:
            return x, y
        return x * 1e4 + 1e4, y


@dataclass
class DeadReLU(Fault):
    """From ``at`` on, ``layer``'s bias is pushed to -100 (the aftermath of a bad update):
    every ReLU after it is off, so it and every layer before it get zero gradient."""

    at: int
    layer: str
    name = "dead_relu"
    kinds = ("dead_layer",)
    also = ("loss_stall", "loss_divergence", "run_lost", "vanishing_layer", "layer_ratio", "spike")

    def span(self, steps: int) -> tuple[int, int]:
        return self.at, steps - 1

    def origin(self) -> str:
        return self.layer

    def before_step(self, step: int, model: nn.Module) -> None:
        if step == self.at:
            with torch.no_grad():
                model.get_submodule(self.layer).bias.fill_(-100.0)


class Vanishing(Fault):
    """A deep sigmoid stack: the first layers' gradients vanish for the whole run."""

    name = "vanishing"
    kinds = ("vanishing_layer", "vanishing")
    also = ("layer_ratio", "layer_dispersion", "loss_stall")


class ExplodingRNN(Fault):
    """A tanh RNN with SGD on a long-range task: the gradient explodes from the start
    (saturated units then pass exactly zero gradient to some layers)."""

    name = "exploding_rnn"
    kinds = ("exploding", "loss_divergence", "nonfinite", "run_lost")
    also = ("spike", "clip_saturated", "loss_stall", "layer_ratio", "dead_layer", "vanishing_layer")


@dataclass
class OverflowingBatches(Fault):
    """Every ``every``-th batch from ``at`` (``count`` of them) has inputs ×``factor``: a
    LayerNorm model is unchanged by the scale in fp32, but the values overflow fp16, so the
    GradScaler skips those steps (and halves its scale each time)."""

    at: int
    count: int
    every: int = 3
    factor: float = 3e5
    name = "fp16_overflow"
    kinds = ("amp_overflow",)

    def span(self, steps: int) -> tuple[int, int]:
        return self.at, self.at + (self.count - 1) * self.every

    def batch(self, step: int, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        hit = self.at <= step <= self.span(0)[1] and (step - self.at) % self.every == 0
        return (x * self.factor, y) if hit else (x, y)


@dataclass
class ShortGrowthInterval(Fault):
    """A GradScaler whose scale doubles every ``interval`` steps keeps overshooting into
    fp16 overflow (skipping about one step in ``interval``), from ``at`` on."""

    interval: int
    at: int = 0
    name = "fp16_overflow"
    kinds = ("amp_overflow",)

    def span(self, steps: int) -> tuple[int, int]:
        return self.at, steps - 1


@dataclass
class ScaleCollapse(Fault):
    """Values overflow fp16 on every step from ``at`` on (inputs ×``factor`` into a
    LayerNorm model: harmless in fp32): the GradScaler halves its scale at each step until
    it underflows."""

    at: int
    factor: float = 3e5
    name = "loss_scale_collapse"
    kinds = ("loss_scale_collapse", "amp_overflow")
    also = ("vanishing", "run_lost", "dead_layer", "vanishing_layer", "loss_stall")

    def span(self, steps: int) -> tuple[int, int]:
        return self.at, steps - 1

    def batch(self, step: int, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        return (x * self.factor, y) if step >= self.at else (x, y)


@dataclass
class LabelNoise(Fault):
    """Every label is replaced by a random class: there is nothing to learn."""

    classes: int
    seed: int = 0
    name = "label_noise"
    kinds = ("loss_stall",)

    def batch(self, step: int, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        gen = torch.Generator().manual_seed(self.seed * 7919 + step)
        return x, torch.randint(0, self.classes, y.shape, generator=gen)


@dataclass
class FrozenByMistake(Fault):
    """``layer``'s forward runs under ``torch.no_grad()`` (a leftover from a frozen phase):
    its parameters still require grad but never get one."""

    layer: str
    name = "frozen_layer"
    kinds = ("dead_layer",)
    also = ("loss_stall",)

    def origin(self) -> str:
        return self.layer

    def setup(self, model: nn.Module) -> None:
        module = model.get_submodule(self.layer)
        forward = module.forward

        def frozen(*args: object, **kwargs: object) -> object:
            with torch.no_grad():
                return forward(*args, **kwargs)

        module.forward = frozen  # type: ignore[method-assign]
