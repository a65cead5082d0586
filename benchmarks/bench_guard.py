"""Cost of ``Guard.step`` over a bare ``optimizer.step()``, per policy, same run.

Run by hand: ``python benchmarks/bench_guard.py [--rounds N] [--model gpt2|resnet50|mlp]``.
Prints two figures first, then a table per optimizer:

* **fixed cost**: on a tiny 4-tensor MLP with fused AdamW, the default guard's cost per
  step beyond the bare step, against ``torch.nn.utils.clip_grad_norm_``'s (target ≤ 1x),
  with and without recording, and on the device-math path (``host_math=False``: torch
  operations as on an accelerator; the count of torch operations per step is printed);
* **fused fold**: on ``--model`` with fused AdamW, the cost of ``ClipNorm(1.0)`` folded
  into the optimizer's kernel, against ``clip_grad_norm_`` (target ≤ 0.4x). The
  gradients have a global norm of about 1, as in the first-wave figures, so most steps
  do not clip: the guard then passes the kernel nothing to divide by.

The clip cost of a variant is its time minus the bare optimizer step; ratios compare it
with the clip cost of ``torch.nn.utils.clip_grad_norm_`` measured in the same rounds.
Host syncs per step are counted by wrapping the tensor→host conversions (they are free
on the CPU, where the guard reads its norms on purpose: see ``host_math``).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile

import torch
from _shapes import gpt2_small_shapes, make_params, mlp_1000_shapes, resnet50_shapes
from _timing import interleaved
from torch._inductor import metrics as inductor_metrics
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

import gradguard as gg
from gradguard import _compiled

SHAPES = {"gpt2": gpt2_small_shapes, "resnet50": resnet50_shapes, "mlp": mlp_1000_shapes}


def fresh(params):
    """Stand in for ``backward()``: new gradient tensors (same values), so the guard sees
    a new step; costs the same in every candidate."""
    for p in params:
        p.grad = p.grad.detach()


def variants(named, fused: bool):
    params = [p for _, p in named]
    opt = torch.optim.AdamW(params, lr=1e-6, fused=fused)
    guards = {
        "ClipNorm(1.0)": gg.Guard(named, gg.ClipNorm(1.0)),
        "ClipNorm(1.0), no folding": gg.Guard(named, gg.ClipNorm(1.0), fold_fused=False),
        "default (SkipNonFinite+FeedbackClip)": gg.Guard(named),
        "old default (SkipNonFinite+ZClip)": gg.Guard(named, old_default()),
        "AutoClip(history=10000)": gg.Guard(named, gg.AutoClip(history=10_000)),
        "SkipSpike+ClipNorm": gg.Guard(named, gg.chain(gg.SkipSpike(), gg.ClipNorm(1.0))),
        "ClipTensorNorm(1.0)": gg.Guard(named, gg.ClipTensorNorm(1.0)),
        "AGC(0.01)": gg.Guard(named, gg.AGC()),
    }
    return candidates(params, opt, {f"guard {name}": g for name, g in guards.items()})


def old_default() -> gg.Policy:
    """The default policy until FeedbackClip replaced it."""
    return gg.chain(gg.SkipNonFinite(), gg.ZClip(warmup_max_norm=10.0))


def candidates(params, opt, guards):
    """A bare step, torch's clip and a step, and each guard's step (given the loss, as
    users are told to), on fresh gradients."""
    loss = torch.tensor(1.0)
    out = {
        "optimizer.step() alone": lambda: (fresh(params), opt.step()),
        "clip_grad_norm_ + step": lambda: (
            fresh(params),
            torch.nn.utils.clip_grad_norm_(params, 1.0),
            opt.step(),
        ),
    }
    for name, guard in guards.items():
        out[name] = lambda guard=guard: (fresh(params), guard.step(opt, loss=loss))
    return out


def count_syncs(fn, steps: int = 5) -> float:
    names = ("item", "tolist", "cpu", "__bool__", "__float__")
    saved = {n: getattr(torch.Tensor, n) for n in names}
    calls = [0]

    def wrap(original):
        def counted(self, *args, **kwargs):
            calls[0] += 1
            return original(self, *args, **kwargs)

        return counted

    for n in names:
        setattr(torch.Tensor, n, wrap(saved[n]))
    try:
        for _ in range(steps):
            fn()
    finally:
        for n, m in saved.items():
            setattr(torch.Tensor, n, m)
    return calls[0] / steps


class _CountOps(TorchDispatchMode):
    """Counts the torch operations (kernel launches on an accelerator) run inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def ops_per_step(fn, steps: int = 3) -> float:
    with _counting_compiled():
        fn()  # past any first-step work (a compile: its kernels are counted)
        with _CountOps() as counter:
            for _ in range(steps):
                fn()
    return counter.count / steps


@contextlib.contextmanager
def _counting_compiled():
    """Count a compiled policy update (``Guard(compile=True)``) as the kernels Inductor
    generated for it: it runs outside the counting mode, under which nothing is traced."""
    original = _compiled._function
    kernels = [0]
    torch._dynamo.reset()  # compile again, here, to count the kernels generated

    def counted(*args):
        with _disable_current_modes() as modes:
            before = inductor_metrics.generated_kernel_count
            out = original()(*args)
            kernels[0] = max(kernels[0], inductor_metrics.generated_kernel_count - before)
        for mode in modes:
            if isinstance(mode, _CountOps):
                mode.count += kernels[0]
        return out

    _compiled._function = lambda: counted
    try:
        yield
    finally:
        _compiled._function = original


def tiny_mlp():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    ((model(torch.randn(32, 8)) - torch.randn(32, 1)) ** 2).mean().backward()
    return model


def fixed_cost(rounds: int, repeats: int) -> None:
    """The default guard's per-step cost on a tiny model, against torch's clip."""
    model = tiny_mlp()
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=1e-6, fused=True)
    store = tempfile.mkdtemp(prefix="gradguard-bench-")
    guards = {
        "default guard": gg.Guard(model),
        "default guard, recording": gg.Guard(model, store=store, health=False),
        "default guard, device math": gg.Guard(model, host_math=False, compile=False),
        "default, device math compiled": gg.Guard(model, host_math=False, compile=True),
        "old default (ZClip) guard": gg.Guard(model, old_default()),
        "old default, device math": gg.Guard(model, old_default(), host_math=False),
        "ClipNorm(1.0) guard": gg.Guard(model, gg.ClipNorm(1.0)),
    }
    cands = candidates(params, opt, guards)
    samples: dict[str, list[float]] = {name: [] for name in cands}
    for _ in range(repeats):  # medians of medians: the machine is shared and noisy
        for name, t in interleaved(cands, rounds).items():
            samples[name].append(t)
    times = {name: statistics.median(v) for name, v in samples.items()}
    base = times["optimizer.step() alone"]
    torch_clip = times["clip_grad_norm_ + step"] - base
    print("Fixed cost: tiny 4-tensor MLP, fused AdamW")
    print(f"  optimizer.step() alone {base * 1e6:.0f} us")
    print(f"  {'variant':30s} {'beyond step':>12s} {'vs torch clip':>14s} {'torch ops':>10s}")
    for name in list(cands)[1:]:
        cost = times[name] - base
        ops = ops_per_step(cands[name]) - ops_per_step(cands["optimizer.step() alone"])
        print(f"  {name:30s} {cost * 1e6:9.0f} us {cost / torch_clip:13.2f}x {ops:10.0f}")
    for guard in guards.values():
        guard.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--model", choices=sorted(SHAPES), default="gpt2")
    parser.add_argument("--tiny-rounds", type=int, default=300)
    parser.add_argument("--tiny-repeats", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, model {args.model}\n")
    fixed_cost(args.tiny_rounds, args.tiny_repeats)
    for fused in (True, False):
        named = make_params(SHAPES[args.model](), torch.float32)
        cands = variants(named, fused)
        times = interleaved(cands, args.rounds)
        base = times["optimizer.step() alone"]
        torch_clip = times["clip_grad_norm_ + step"] - base
        print(f"\nAdamW(fused={fused}): optimizer.step alone {base * 1e3:.1f} ms")
        header = f"{'median':>9s} {'clip cost':>10s} {'vs torch clip':>14s} {'syncs/step':>10s}"
        print(f"  {'variant':44s} {header}")
        for name, t in times.items():
            cost = t - base
            syncs = count_syncs(cands[name], steps=3)
            print(
                f"  {name:44s} {t * 1e3:7.1f}ms {cost * 1e3:8.2f}ms "
                f"{cost / torch_clip:13.2f}x {syncs:10.1f}"
            )
        if fused:
            fold = (times["guard ClipNorm(1.0)"] - base) / torch_clip
            print(f"  fused fold: ClipNorm(1.0) folded into fused AdamW / torch clip: {fold:.2f}x")


if __name__ == "__main__":
    main()
