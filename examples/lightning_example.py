"""Lightning + gradguard: one callback instead of ``gradient_clip_val``. Runs on CPU in seconds.

A bad batch (NaN loss) at steps 5 and 21 is skipped: parameters and AdamW's state stay as
they were and the step-interval LR schedule holds; the run store records every step with
its loss and learning rate.

    python examples/lightning_example.py [RUN_DIR]
"""

import sys
import tempfile

import lightning as L
import torch
from torch import nn

from gradguard import RunStore
from gradguard.integrations.lightning import GradGuardCallback


class Regression(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        return loss * float("nan") if batch_idx == 5 else loss

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=1e-2)
        scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=0.95)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }


def main(run_dir: str) -> None:
    torch.manual_seed(0)
    x = torch.randn(256, 8)
    y = x.sum(dim=1, keepdim=True).sin()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    trainer = L.Trainer(
        max_epochs=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[GradGuardCallback(store=run_dir, log_every=10)],  # default policy
    )
    trainer.fit(Regression(), loader)
    steps = RunStore.open(run_dir).steps()
    skipped = steps["step"][steps["skipped"]].tolist()
    print(f"{len(steps['step'])} steps recorded in {run_dir}, final loss {steps['loss'][-1]:.4f}")
    print(f"skipped steps: {skipped}")
    for step in skipped:
        lr = steps["lr"][step : step + 2].tolist()
        print(f"  lr at steps {step} and {step + 1}: {lr[0]:.6f} {lr[1]:.6f} (held)")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="gradguard-lightning-"))
