"""Cost of GradientNoise and of the adaptive DP clip, against torch baselines in the same run.

Run by hand: ``python benchmarks/bench_privacy.py [--rounds N]``.

1. GradientNoise's transform (one generator draw per device/dtype group, one foreach
   add) against ``torch.nn.utils.clip_grad_norm_`` and against the usual per-parameter
   ``p.grad.add_(torch.randn_like(p.grad) * std)`` loop.
2. A private training step (forward, backward, Opacus ``DPOptimizer.step``) with and
   without :class:`~gradguard.privacy.AdaptiveQuantileClip` plus a per-example monitor.
"""

from __future__ import annotations

import argparse
import warnings

import torch
from _shapes import make_params, resnet50_shapes
from _timing import interleaved
from torch import nn

import gradguard as gg
from gradguard.policies.noise import GradientNoise

MAX_NORM = 1e9


def noise_candidates(named):
    params = [p for _, p in named]
    grads = [p.grad for p in params]
    policy = GradientNoise(eta=0.01, seed=0)
    gen = torch.Generator().manual_seed(0)

    stats = gg.measure(params)  # decide() only needs it for the gradient count

    def ours():
        for transform in policy.decide(stats, params).transforms:
            transform(params, grads)

    def loop():
        for g in grads:
            g.add_(torch.randn(g.shape, generator=gen, dtype=g.dtype) * 0.1)

    return {
        "torch.clip_grad_norm_": lambda: torch.nn.utils.clip_grad_norm_(params, MAX_NORM),
        "GradientNoise transform": ours,
        "per-param randn loop": loop,
    }


def dp_candidates(batch: int):
    import opacus

    from gradguard.privacy import AdaptiveQuantileClip, PerSampleMonitor

    def setup(adaptive: bool):
        torch.manual_seed(0)
        model = opacus.GradSampleModule(
            nn.Sequential(
                nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10)
            )
        )
        optimizer = opacus.optimizers.DPOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.0),
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            expected_batch_size=batch,
        )
        if adaptive:
            AdaptiveQuantileClip(initial_clip=None, seed=0).attach(
                optimizer, monitor=PerSampleMonitor(every=1), model=model
            )
        x, y = torch.randn(batch, 256), torch.randint(0, 10, (batch,))

        def step():
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()

        return step

    return {
        "Opacus DPOptimizer step": setup(False),
        "+ AdaptiveQuantileClip + monitor": setup(True),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, {args.rounds} interleaved rounds")
    named = make_params(resnet50_shapes(), torch.float32)
    times = interleaved(noise_candidates(named), args.rounds)
    base = times["torch.clip_grad_norm_"]
    print(f"\nResNet-50 shapes, fp32: {len(named)} tensors")
    for name, t in times.items():
        print(f"  {name:36s} {t * 1e3:8.2f}ms {t / base:8.3f}x torch clip")
    try:
        import opacus  # noqa: F401
    except ImportError:
        print("\nopacus not installed: DP step skipped")
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for batch in (64, 256):
            times = interleaved(dp_candidates(batch), args.rounds)
            base = times["Opacus DPOptimizer step"]
            print(f"\nMLP 256-512-512-10 (0.4M params), batch {batch}, fwd+bwd+step")
            for name, t in times.items():
                print(f"  {name:36s} {t * 1e3:8.2f}ms {t / base:8.3f}x Opacus step")


if __name__ == "__main__":
    main()
