"""Accelerate + gradguard: ``guard_gradients`` where ``accelerator.clip_grad_norm_`` was.

Gradient accumulation over 4 micro-batches; a NaN loss at optimizer step 3 is skipped:
``accelerator.optimizer_step_was_skipped`` is True, so the prepared scheduler holds the
learning rate, as on an fp16 overflow.

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
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=0.9)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    guard = Guard(model, chain(SkipNonFinite(), ClipNorm(1.0)))  # clip_grad_norm_(..., 1.0)

    for i, (xb, yb) in enumerate(loader):
        with accelerator.accumulate(model):
            loss = nn.functional.mse_loss(model(xb), yb)
            if i // 4 == 3:
                loss = loss * float("nan")  # a bad batch
            accelerator.backward(loss)
            result = guard_gradients(accelerator, guard, optimizer, loss=loss)  # None mid-accum
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
        if result is not None:
            state = "skipped" if result.is_skipped() else f"coef {float(result.clip_coef):.2f}"
            lr = scheduler.get_last_lr()[0]
            accelerator.print(
                f"step {result.step}: norm {float(result.total_norm):.3f} {state}, "
                f"optimizer_step_was_skipped={accelerator.optimizer_step_was_skipped}, lr {lr:.5f}"
            )
    guard.close()


if __name__ == "__main__":
    main()
