"""DeepSpeed + gradguard: guard the steps of a ZeRO-2 engine through the engine itself.

Runs one CPU process with gloo. ``guard.step()`` replaces ``engine.step()``. The config's
``gradient_clipping=1.0`` becomes ``chain(SkipNonFinite(), ClipNorm(1.0))``: DeepSpeed
clips at the policy's threshold, and the bad batch at step 4 goes DeepSpeed's overflow
path (not applied, counted in ``engine.skipped_steps``, the LR scheduler held).

    python examples/deepspeed_example.py [RUN_DIR]
    # several processes: deepspeed --num_gpus N examples/deepspeed_example.py
"""

import os
import sys
import tempfile

import deepspeed
import torch
from torch import nn

from gradguard import RunStore
from gradguard.integrations.deepspeed import DeepSpeedGuard


def main(run_dir: str) -> None:
    for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29533", "RANK": "0",
                       "WORLD_SIZE": "1", "LOCAL_RANK": "0"}.items():  # fmt: skip
        os.environ.setdefault(key, value)
    deepspeed.init_distributed(dist_backend="gloo")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1))
    config = {
        "train_micro_batch_size_per_gpu": 16,
        "gradient_accumulation_steps": 2,
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": 2},
        "steps_per_print": 10**9,
    }
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    guard = DeepSpeedGuard(engine, monitor_only=False, store=run_dir, log_every=5)
    x = torch.randn(320, 8)
    y = x.sum(dim=1, keepdim=True).sin()
    for i in range(0, len(x), 16):
        loss = nn.functional.mse_loss(engine(x[i : i + 16]), y[i : i + 16])
        if i // 32 == 3:
            loss = loss * float("nan")  # a bad batch at step 4
        engine.backward(loss)
        guard.step(loss=loss)
    guard.close()
    steps = RunStore.open(run_dir).steps()
    print(f"{len(steps['step'])} steps in {run_dir}; norms {steps['total_norm'].round(3)}")
    print(f"skipped steps: {steps['step'][steps['skipped']].tolist()}, "
          f"DeepSpeed skipped_steps={engine.skipped_steps}")  # fmt: skip
    print(f"clipped at 1.0: {int(steps['clipped'].sum())} steps")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="gradguard-ds-"))
