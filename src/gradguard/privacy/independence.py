"""Whether one example's outputs and gradients depend on another's: a probe on a small batch.

DP-SGD bounds each example's influence by clipping that example's gradient; the bound
means nothing when a layer mixes the examples of a batch (BatchNorm in training mode,
with or without affine parameters; a custom module that subtracts the batch mean).
Types catch the known layers, this probe the rest. It runs the model in training mode
on a batch, changes the last example, runs it again from the same state and random
seed, and names

* every sub-module whose outputs for the *other* examples moved although its inputs for
  them did not: it mixes examples in its forward;
* every sub-module whose buffers the batch wrote (running statistics): data kept in the
  model that no DP noise covers;
* the model itself, when no sub-module explains it but the gradient of the other
  examples' outputs moved (mixing in a backward pass, or outside any sub-module).

Dimension 0 of every input is the batch (Opacus's ``batch_first=True``); only the first
batched input is changed. The model is left as it was: buffers, training flags,
parameters' ``.grad`` and the global random state.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .errors import ModelProblem

#: Examples in an inferred probe batch: odd, so unlikely to equal a length or a width.
PROBE_EXAMPLES = 7
_RTOL = 1e-5
_MAX_DEPTH = 4

MIXES = (
    "in training mode its output for one example depends on the other examples of the "
    "batch (changing one example moved the others' outputs), so a per-example gradient "
    "is not one example's and DP clipping bounds nothing."
)
MIX_FIX = "normalise per example: GroupNorm or LayerNorm instead of batch statistics"
WRITES_BUFFERS = (
    "in training mode it writes {names} from the batch: the trained model then carries "
    "statistics of the data that no DP noise covers."
)
BUFFER_FIX = "track_running_stats=False, or GroupNorm/LayerNorm, which keep no statistics"
BACKWARD = (
    "changing one example moved the gradient of the other examples' outputs: something "
    "mixes examples in a backward pass or outside any sub-module."
)

Call = tuple[list[Tensor], list[Tensor]]  # batched inputs, batched outputs of one call


class Inconclusive(ValueError):
    """Dimension 0 of the probe batch is not the batch for some layer of the model."""


#: Spatial sizes tried for a convolutional first layer, most common first.
SPATIAL_SIZES = (32, 28, 64, 224, 16, 8, 6)


def probe_inputs(model: nn.Module, examples: int = PROBE_EXAMPLES) -> Iterator[Tensor]:
    """Random batches for the first layer whose input its type tells (several spatial
    sizes for a convolution); nothing when no layer tells."""
    for module in model.modules():
        shapes = _input_shapes(module, examples)
        if not shapes:
            continue
        param = next(module.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        dtype = param.dtype if param is not None and param.is_floating_point() else None
        for shape in shapes:
            gen = torch.Generator().manual_seed(0)
            if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
                yield torch.randint(0, module.num_embeddings, shape, generator=gen).to(device)
            else:
                yield torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
        return


def _input_shapes(module: nn.Module, n: int) -> list[tuple[int, ...]]:
    if isinstance(module, nn.Linear):  # 3-D too: attention takes 2-D as one unbatched input
        return [(n, module.in_features), (n, 5, module.in_features)]
    if isinstance(module, nn.modules.conv._ConvNd) and not module.transposed:
        dims = len(module.kernel_size)
        sizes = SPATIAL_SIZES if dims < 3 else SPATIAL_SIZES[-3:]
        return [(n, module.in_channels, *[size] * dims) for size in sizes]
    if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
        return [(n, 5)]
    if isinstance(module, nn.LayerNorm):
        return [(n, *module.normalized_shape)]
    if isinstance(module, nn.GroupNorm):
        return [(n, module.num_channels, 4)]
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        dims = {nn.BatchNorm2d: 2, nn.BatchNorm3d: 3}.get(type(module), 0)
        return [(n, module.num_features, *[4] * dims)]
    if isinstance(module, nn.RNNBase) and module.batch_first:
        return [(n, 5, module.input_size)]
    return []


def independence_problems(model: nn.Module, example_input: Any) -> list[ModelProblem]:
    """Run the probe on ``example_input`` (a tensor, a tuple of positional inputs or a
    dict of keyword inputs, batch first) and return what mixes examples."""
    args, kwargs = _as_call(example_input)
    n = _batch_size(args, kwargs)
    changed_args, changed_kwargs = _change_last_example(args, kwargs, n)
    runner = _Runner(model, n)
    with runner.isolated():
        first = runner.run(args, kwargs)
        second = runner.run(changed_args, changed_kwargs)
    return runner.problems(first, second)


def _as_call(example_input: Any) -> tuple[tuple, dict]:
    if isinstance(example_input, Tensor):
        return (example_input,), {}
    if isinstance(example_input, (tuple, list)):
        return tuple(example_input), {}
    if isinstance(example_input, Mapping):
        return (), dict(example_input)
    raise TypeError(
        "example_input must be a tensor, a tuple of positional inputs or a dict of keyword "
        f"inputs, got {type(example_input).__name__}"
    )


def _batch_size(args: tuple, kwargs: dict) -> int:
    first = next((t for t in _tensors((args, kwargs)) if t.dim() > 0), None)
    if first is None:
        raise ValueError("example_input: holds no tensor with a batch dimension")
    if first.shape[0] < 2:
        raise ValueError(
            f"example_input: the probe needs at least 2 examples, got {first.shape[0]}"
        )
    return int(first.shape[0])


def _change_last_example(args: tuple, kwargs: dict, n: int) -> tuple[tuple, dict]:
    """Copies of the inputs whose first batched tensor differs in its last example."""
    done = False

    def change(value: Any) -> Any:
        nonlocal done
        if done or not isinstance(value, Tensor) or value.dim() == 0 or value.shape[0] != n:
            return value
        done = True
        out = value.clone()
        if out.is_floating_point() or out.is_complex():
            gen = torch.Generator().manual_seed(1)
            noise = torch.randn(out[-1].shape, generator=gen).to(out.device, out.real.dtype)
            out[-1] += 2.0 * (1.0 + float(out.abs().std(unbiased=False))) * noise
        elif out.dtype == torch.bool:
            out[-1] = ~out[-1]
        else:
            other = next((k for k in range(n - 1) if not torch.equal(out[k], out[-1])), None)
            out[-1] = out[other] if other is not None else out[-1] ^ 1
        return out

    new_args = tuple(change(a) for a in args)
    new_kwargs = {k: change(v) for k, v in kwargs.items()}
    return new_args, new_kwargs


def _tensors(obj: Any, depth: int = 0) -> list[Tensor]:
    """Tensors inside nested tuples, lists and mappings (model outputs, hook arguments)."""
    if isinstance(obj, Tensor):
        return [obj]
    if depth >= _MAX_DEPTH:
        return []
    if isinstance(obj, Mapping):
        obj = list(obj.values())
    if isinstance(obj, (tuple, list)):
        return [t for item in obj for t in _tensors(item, depth + 1)]
    return []


def _moved(a: Tensor, b: Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return True
    if not (a.is_floating_point() or a.is_complex()):
        return not torch.equal(a, b)
    scale = float(torch.maximum(a.abs().amax(), b.abs().amax())) if a.numel() else 0.0
    return not torch.allclose(a, b, rtol=_RTOL, atol=_RTOL * scale + 1e-30, equal_nan=True)


def _others(t: Tensor) -> Tensor:
    return t[:-1]


def _mixes(first: Call, second: Call) -> bool:
    (in_a, out_a), (in_b, out_b) = first, second
    if len(in_a) != len(in_b) or len(out_a) != len(out_b):
        return False
    inputs_kept = not any(_moved(_others(a), _others(b)) for a, b in zip(in_a, in_b))
    return inputs_kept and any(_moved(_others(a), _others(b)) for a, b in zip(out_a, out_b))


def _module_mixes(first: list[Call], second: list[Call]) -> bool:
    return len(first) == len(second) and any(_mixes(a, b) for a, b in zip(first, second))


def _not_batch_first(module: nn.Module, args: tuple, kwargs: dict, n: int) -> bool:
    """Whether a sequence layer reads dimension 0 as something else than the batch: a
    2-D (unbatched) input, or a time-major one whose length happens to equal ``n``."""
    if not isinstance(module, (nn.MultiheadAttention, nn.RNNBase)):
        return False
    first = next(iter(_tensors((args, kwargs))), None)
    if first is None:
        return False
    return first.dim() < 3 or (not module.batch_first and first.shape[0] == n)


class _Run:
    def __init__(self) -> None:
        self.unclear: str | None = None  # a layer for which dim 0 is not the batch
        self.calls: dict[str, list[Call]] = {}
        self.buffers: dict[str, dict[str, Tensor]] = {}
        self.grads: list[Tensor | None] | None = None


class _Runner:
    """Runs the model on a batch from one saved state, recording what each module saw."""

    def __init__(self, model: nn.Module, n: int) -> None:
        inner = getattr(model, "_module", None)
        self.wrapper = model if hasattr(model, "disable_hooks") else None  # Opacus's
        self.model = inner if self.wrapper is not None and isinstance(inner, nn.Module) else model
        self.n = n
        self.named = list(self.model.named_modules())
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self._saved: list[tuple[nn.Module, str, Tensor, Tensor]] = []

    @contextlib.contextmanager
    def isolated(self) -> Iterator[None]:
        """Training mode, buffers and random state saved; all restored on the way out."""
        modes = [(m, m.training) for _, m in self.named]
        hooks_on = self.wrapper is not None and getattr(self.wrapper, "hooks_enabled", False)
        self._saved = [
            (m, key, buf, buf.detach().clone())
            for _, m in self.named
            for key, buf in m._buffers.items()
            if buf is not None
        ]
        devices = sorted({t.device.index or 0 for *_, t in self._saved if t.is_cuda})
        devices += [p.device.index or 0 for p in self.params if p.is_cuda]
        try:
            if hooks_on:
                self.wrapper.disable_hooks()
            self.model.train()
            with torch.random.fork_rng(devices=sorted(set(devices))):
                yield
        finally:
            self._restore()
            for module, mode in modes:
                module.training = mode
            if hooks_on:
                self.wrapper.enable_hooks()

    def _restore(self) -> None:
        with torch.no_grad():
            for module, key, original, saved in self._saved:
                module._buffers[key] = original
                original.copy_(saved)

    def run(self, args: tuple, kwargs: dict) -> _Run:
        self._restore()
        run = _Run()
        handles = [
            module.register_forward_hook(self._recorder(run, name), with_kwargs=True)
            for name, module in self.named
        ]
        try:
            torch.manual_seed(0)  # the same dropout masks in both runs
            output = self.model(*args, **kwargs)
        finally:
            for handle in handles:
                handle.remove()
        run.buffers = {
            name: {k: b.detach().clone() for k, b in m._buffers.items() if b is not None}
            for name, m in self.named
        }
        run.grads = self._gradient_of_others(output)
        return run

    def _recorder(self, run: _Run, name: str) -> Any:
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            if run.unclear is None and _not_batch_first(module, args, kwargs, self.n):
                run.unclear = f"{name!r} ({type(module).__name__})"
            run.calls.setdefault(name, []).append(
                (self._batched((args, kwargs)), self._batched(output))
            )

        return hook

    def _batched(self, obj: Any) -> list[Tensor]:
        return [t.detach().clone() for t in _tensors(obj) if t.dim() > 0 and t.shape[0] == self.n]

    def _gradient_of_others(self, output: Any) -> list[Tensor | None] | None:
        out = next(
            (
                t
                for t in _tensors(output)
                if t.requires_grad and t.dim() > 0 and t.shape[0] == self.n
            ),
            None,
        )
        if out is None or not self.params:
            return None
        gen = torch.Generator().manual_seed(2)
        weights = torch.randn(_others(out).shape, generator=gen).to(out.device, out.dtype)
        loss = (_others(out) * weights).sum()
        return list(torch.autograd.grad(loss, self.params, allow_unused=True))

    def problems(self, first: _Run, second: _Run) -> list[ModelProblem]:
        if first.unclear is not None:
            raise Inconclusive(
                f"dimension 0 of the input is not the batch for {first.unclear}, so the "
                "probe cannot tell examples apart there; give a batch-first input of the "
                "shape that layer takes with a batch"
            )
        kinds = {name: type(m).__name__ for name, m in self.named}
        mixing = [
            name
            for name, _ in self.named
            if _module_mixes(first.calls.get(name, []), second.calls.get(name, []))
        ]
        innermost = [
            name
            for name in mixing
            if not any(o != name and (name == "" or o.startswith(name + ".")) for o in mixing)
        ]
        problems = [ModelProblem(name, kinds[name], MIXES, MIX_FIX) for name in innermost]
        for name, buffers in first.buffers.items():
            written = [k for k, b in buffers.items() if _moved(b, second.buffers[name][k])]
            if written:
                names = ", ".join(repr(k) for k in written)
                reason = WRITES_BUFFERS.format(names=f"buffer {names}")
                problems.append(ModelProblem(name, kinds[name], reason, BUFFER_FIX))
        if not innermost and _grads_moved(first.grads, second.grads):
            problems.append(ModelProblem("", type(self.model).__name__, BACKWARD, MIX_FIX))
        return problems


def _grads_moved(a: list[Tensor | None] | None, b: list[Tensor | None] | None) -> bool:
    if a is None or b is None:
        return False
    return any(x is not None and y is not None and _moved(x, y) for x, y in zip(a, b))
