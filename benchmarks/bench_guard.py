"""Cost of ``Guard.step`` over a bare ``optimizer.step()``, per policy, same run.

Run by hand: ``python benchmarks/bench_guard.py [--rounds N] [--model gpt2|resnet50|mlp]``.
The clip cost of a variant is its time minus the bare optimizer step; ratios compare it
with the clip cost of ``torch.nn.utils.clip_grad_norm_`` measured in the same rounds.
Host syncs per step are counted by wrapping the tensor→host conversions.
"""

from __future__ import annotations

import argparse

import torch
from _shapes import gpt2_small_shapes, make_params, mlp_1000_shapes, resnet50_shapes
from _timing import interleaved

import gradguard as gg

SHAPES = {"gpt2": gpt2_small_shapes, "resnet50": resnet50_shapes, "mlp": mlp_1000_shapes}


def variants(named, fused: bool):
    params = [p for _, p in named]
    opt = torch.optim.AdamW(params, lr=1e-6, fused=fused)
    guards = {
        "ClipNorm(1.0)": gg.Guard(named, gg.ClipNorm(1.0)),
        "ClipNorm(1.0), no folding": gg.Guard(named, gg.ClipNorm(1.0), fold_fused=False),
        "default (SkipNonFinite+ZClip)": gg.Guard(named),
        "AutoClip(history=10000)": gg.Guard(named, gg.AutoClip(history=10_000)),
        "SkipSpike+ClipNorm": gg.Guard(named, gg.chain(gg.SkipSpike(), gg.ClipNorm(1.0))),
        "ClipTensorNorm(1.0)": gg.Guard(named, gg.ClipTensorNorm(1.0)),
        "AGC(0.01)": gg.Guard(named, gg.AGC()),
    }
    out = {
        "optimizer.step() alone": opt.step,
        "clip_grad_norm_ + step": lambda: (
            torch.nn.utils.clip_grad_norm_(params, 1.0),
            opt.step(),
        ),
    }
    for name, guard in guards.items():
        out[f"guard {name}"] = lambda guard=guard: guard.step(opt)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--model", choices=sorted(SHAPES), default="gpt2")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, model {args.model}")
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


if __name__ == "__main__":
    main()
