"""Measurement and clipping cost against torch.nn.utils.clip_grad_norm_, same run.

Run by hand: ``python benchmarks/bench_clip.py [--rounds N]``. Prints median time per
call and ratios against torch's clip (measured in the same interleaved rounds) and
against the tutorial-style monitor of the seeds (``.item()`` per parameter).
"""

from __future__ import annotations

import argparse
import math

import torch
from _shapes import gpt2_small_shapes, make_params, mlp_1000_shapes, resnet50_shapes
from _timing import interleaved

import gradguard as gg

MAX_NORM = 1e9  # never binding: the multiply still runs, values stay the same across rounds


def tutorial_monitor(named):
    """The seeds' monitor: per-parameter norm, mean and std, each read back with .item()."""
    report, total_sq = {}, 0.0
    for name, p in named:
        g = p.grad
        norm = g.norm().item()
        report[name] = (norm, g.mean().item(), g.std().item())
        total_sq += norm**2
    return math.sqrt(total_sq), report


def candidates(named):
    params = [p for _, p in named]
    return {
        "torch.clip_grad_norm_": lambda: torch.nn.utils.clip_grad_norm_(params, MAX_NORM),
        "gg.clip_grad_norm_": lambda: gg.clip_grad_norm_(params, MAX_NORM),
        "gg.measure+clip (names, per-tensor kept)": lambda: gg.clip_grad_norm_(
            named, MAX_NORM, return_stats=True
        ),
        "gg.measure only": lambda: gg.measure(named),
        "tutorial monitor (.item() per param)": lambda: tutorial_monitor(named),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cases = [
        ("GPT-2 small fp32", gpt2_small_shapes(), torch.float32),
        ("GPT-2 small bf16", gpt2_small_shapes(), torch.bfloat16),
        ("ResNet-50 fp32", resnet50_shapes(), torch.float32),
        ("MLP 1000 tensors fp32", mlp_1000_shapes(), torch.float32),
    ]
    print(f"torch {torch.__version__}, {args.threads} threads, {args.rounds} interleaved rounds")
    for title, shapes, dtype in cases:
        named = make_params(shapes, dtype)
        n = len(named)
        numel = sum(p.numel() for _, p in named)
        times = interleaved(candidates(named), args.rounds)
        base = times["torch.clip_grad_norm_"]
        tutorial = times["tutorial monitor (.item() per param)"]
        print(f"\n{title}: {n} tensors, {numel / 1e6:.1f}M elements")
        print(f"  {'candidate':42s} {'median':>10s} {'vs torch':>9s} {'vs tutorial':>12s}")
        for name, t in times.items():
            print(f"  {name:42s} {t * 1e3:8.2f}ms {t / base:8.3f}x {t / tutorial:11.3f}x")
        ours = times["gg.measure+clip (names, per-tensor kept)"]
        print(
            f"  per tensor: ours {ours / n * 1e6:.2f} us, overhead over torch "
            f"{(ours - base) / n * 1e6:+.2f} us"
        )


if __name__ == "__main__":
    main()
