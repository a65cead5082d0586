"""Accelerate + gradguard: ``guard_gradients`` where ``accelerator.clip_grad_norm_`` was.

Gradient accumulation over 4 micro-batches; a NaN loss at optimizer step 3 is skipped.

    python examples/accelerate_example.py
"""

import torch
from accelerate import Accelerator
from torch import nn

from gradguard import ClipNorm, Guard, SkipNonFinite, chain
from gradguard.integrations.accelerate import guard_gradients


def main() -> None:
    torch.manual_seed(0)
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=4)
    x = torch.randn(512, 8)
    y = x.sum(dim=1, keepdim=True).sin()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    guard = Guard(model, chain(SkipNonFinite(), ClipNorm(1.0)))

    step = 0
    for i, (xb, yb) in enumerate(loader):
        with accelerator.accumulate(model):
            loss = nn.functional.mse_loss(model(xb), yb)
            if i // 4 == 3:
                loss = loss * float("nan")  # a bad batch
            accelerator.backward(loss)
            result = guard_gradients(accelerator, guard, optimizer, loss=loss)  # None mid-accum
            optimizer.step()
            optimizer.zero_grad()
        if result is not None:
            state = "skipped" if bool(result.skipped) else f"coef {float(result.clip_coef):.2f}"
            accelerator.print(f"step {step}: norm {float(result.total_norm):.3f} {state}")
            step += 1


if __name__ == "__main__":
    main()
