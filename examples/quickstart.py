"""gradguard in a plain PyTorch loop: AMP (bf16 autocast), accumulation, recording, report.

Run: ``python examples/quickstart.py [RUN_DIR]`` (CPU, a few seconds). A NaN batch at
micro-batch 41 is skipped; the run is recorded under RUN_DIR with an HTML report.
"""

from __future__ import annotations

import math
import sys
import warnings

import torch
from torch import nn

import gradguard as gg
from gradguard.report import build_report

ACCUMULATE = 4


def main(run_dir: str = "runs/quickstart") -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 1)
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, fused=True)
    guard = gg.Guard(model, store=run_dir, log_every=10)  # default policy: skip NaN, FeedbackClip
    target = torch.randn(16, 1)
    skipped = []
    for micro in range(200):
        x = torch.randn(32, 16)
        y = x @ target
        if micro == 41:
            x[0, 0] = math.nan  # a corrupted sample
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = nn.functional.mse_loss(model(x).float(), y) / ACCUMULATE
        loss.backward()
        if (micro + 1) % ACCUMULATE:
            continue  # accumulate: the guard acts once, on the summed gradients
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the skip is reported below and in the store
            result = guard.step(optimizer, loss=loss * ACCUMULATE)
        optimizer.zero_grad()
        if bool(result.skipped):  # one sync, only to print it here
            skipped.append((result.step, guard.nonfinite_origin(result)))
    guard.close()
    steps = gg.RunStore.open(run_dir).steps()
    print(f"optimizer steps: {len(steps['step'])}, skipped: {skipped}")
    print(f"final loss: {steps['loss'][-10:].mean():.4f}")
    print(f"report: {build_report(run_dir)}")


if __name__ == "__main__":
    main(*sys.argv[1:])
