"""Lightning + gradguard: one callback instead of ``gradient_clip_val``. Runs on CPU in seconds.

A bad batch (NaN loss) at step 5 is skipped; the run store records every step.

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
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


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
    print(f"{len(steps['step'])} steps recorded in {run_dir}")
    print(f"skipped steps: {steps['step'][steps['skipped']].tolist()}")
    print(f"clipped steps: {int(steps['clipped'].sum())}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="gradguard-lightning-"))
