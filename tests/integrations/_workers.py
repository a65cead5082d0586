"""The framework integrations on several gloo ranks (CPU, 127.0.0.1), batched per world size.

Each world size is spawned once per pytest process (:func:`results`): every rank runs the
scenarios of that size (Lightning DDP and FSDP2, the HF Trainer and Accelerate with and
without FSDP2, DeepSpeed ZeRO 0-3 on 2 ranks; DeepSpeed on 4) and saves what it saw, and
the tests compare the ranks with each other and with an unsharded run of the same data.
Spawning and importing the frameworks cost most of the time, hence one spawn per size.
"""

from __future__ import annotations

import functools
import importlib
import math
import os
import traceback
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from tests.distributed._workers import run_ranks

TIMEOUT_S = 420
BATCH, STEPS, NAN_STEP, LR = 4, 4, 2, 0.05
#: ZeRO stage and precision of the DeepSpeed engines run on 2 and 4 ranks.
DEEPSPEED = {2: [(0, "fp32"), (1, "bf16"), (2, "fp32"), (3, "fp32")], 4: [(1, "fp32"), (3, "bf16")]}


@functools.cache
def results(world: int) -> list[dict[str, Any]]:
    """Run every scenario of ``world`` ranks; each rank's findings, by rank."""
    return run_ranks(_entry, world, "gg-integrations", TIMEOUT_S)


def _entry(rank: int, world: int, port: int, out: str) -> None:
    env = dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), NODE_RANK="0")
    os.environ.update(env, LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    dist.init_process_group("gloo", rank=rank, world_size=world)
    found: dict[str, Any] = {}
    root = Path(out)
    only = os.environ.get("GG_SCENARIOS")  # e.g. "lightning,deepspeed" while debugging one
    scenarios = {
        "lightning": lambda: _lightning(rank, root),
        "transformers": lambda: _transformers(rank, root),
        "accelerate": lambda: _accelerate(rank, root),
        "deepspeed": lambda: _deepspeed(rank, world, root, DEEPSPEED[world]),
    }
    if world != 2:
        scenarios = {"deepspeed": scenarios["deepspeed"]}
    try:
        for name, run in scenarios.items():
            if only is None or name in only.split(","):
                found[name] = run()
    except Exception:
        found = {"error": traceback.format_exc()}
    torch.save(found, root / f"rank{rank}.pt")
    if "error" not in found:
        dist.barrier()
    dist.destroy_process_group()


# -- shared pieces -------------------------------------------------------------------------


def _net() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 1))


def _data(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 6, generator=g)
    return x, (x[:, :1] * 3).tanh() + 0.1 * torch.randn(n, 1, generator=g)


def _policy() -> Any:
    from gradguard import ClipNorm, SkipNonFinite, chain

    return chain(SkipNonFinite(), ClipNorm(1.0))


def _stored(path: Path, rank: int) -> dict[str, list[float]] | None:
    """What rank 0 recorded (every rank is given the same store; only rank 0 writes)."""
    dist.barrier()
    if rank != 0:
        return None
    from gradguard import RunStore

    steps = RunStore.open(path).steps()
    return {k: [float(v) for v in steps[k]] for k in ("step", "total_norm", "skipped", "loss")}


def _full(params: Any) -> list[torch.Tensor]:
    """Full parameter values (DTensor shards gathered)."""
    return [
        p.full_tensor().detach().clone() if hasattr(p, "full_tensor") else p.detach().clone()
        for p in params
    ]


# -- Lightning: DDPStrategy and ModelParallelStrategy (FSDP2) -------------------------------


def _lightning(rank: int, root: Path) -> dict[str, Any]:
    import lightning as L
    from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy

    from gradguard.integrations.lightning import GradGuardCallback

    x, y = _data(BATCH * 2 * STEPS)

    class Module(L.LightningModule):
        def __init__(self, shard: bool) -> None:
            super().__init__()
            self.net = _net()
            self.shard = shard

        def configure_model(self) -> None:
            if self.shard:
                from torch.distributed.fsdp import fully_shard

                for layer in (self.net[0], self.net[2]):
                    fully_shard(layer, mesh=self.device_mesh["data_parallel"])
                fully_shard(self.net, mesh=self.device_mesh["data_parallel"])

        def training_step(self, batch, batch_idx):
            loss = nn.functional.mse_loss(self.net(batch[0]), batch[1])
            if batch_idx + 1 == NAN_STEP and self.global_rank == 1:
                loss = loss * float("nan")  # one rank's bad batch
            return loss

        def configure_optimizers(self):
            return torch.optim.Adam(self.net.parameters(), lr=LR)

        def train_dataloader(self):
            dataset = torch.utils.data.TensorDataset(x, y)
            return torch.utils.data.DataLoader(dataset, batch_size=BATCH, shuffle=False)

    found: dict[str, Any] = {}
    for name, strategy in (
        ("ddp", DDPStrategy(process_group_backend="gloo")),
        ("fsdp2", ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)),
    ):
        store = root / f"lightning-{name}"
        callback = GradGuardCallback(_policy(), store=store, log_every=1, health=False)
        module = Module(shard=name == "fsdp2")
        trainer = L.Trainer(
            accelerator="cpu",
            devices=2,
            strategy=strategy,
            max_steps=STEPS,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[callback],
        )
        norms, skipped = [], []

        class Watch(L.Callback):
            def __init__(self, guarding: GradGuardCallback) -> None:
                self.guarding = guarding

            def on_train_batch_end(self, trainer, pl_module, *args):
                result = self.guarding.last_result
                norms.append(float(result.total_norm))  # noqa: B023 (used within the loop)
                skipped.append(result.is_skipped())  # noqa: B023

        trainer.callbacks.append(Watch(callback))
        trainer.fit(module)
        found[name] = {
            "norms": norms,
            "skipped": skipped,
            "params": [t.tolist() for t in _full(module.net.parameters())],
            "recording": callback.guard.recorder.active,
            "stored": _stored(store, rank),
        }
    # The unsharded reference: the global batch of both ranks, one process. Lightning
    # gives training a shuffled DistributedSampler (seed 0, epoch 0).
    shards = [
        list(torch.utils.data.DistributedSampler(range(len(x)), 2, r, shuffle=True, seed=0))
        for r in range(2)
    ]
    model = _net()
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    reference = []
    for step in range(STEPS):
        optimizer.zero_grad()
        rows = [shard[step * BATCH : (step + 1) * BATCH] for shard in shards]
        losses = [nn.functional.mse_loss(model(x[r]), y[r]) for r in rows]
        (sum(losses) / 2).backward()  # DDP averages the ranks' gradients
        reference.append(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0).item())
        if step + 1 != NAN_STEP:
            optimizer.step()
    found["reference"] = reference
    found["reference_params"] = [p.detach().tolist() for p in model.parameters()]
    return found


# -- Hugging Face Trainer and Accelerate: DDP and FSDP2 ------------------------------------


class _Regression(nn.Module):
    """A model the Trainer can train: ``forward(x, labels)`` returns the loss."""

    def __init__(self) -> None:
        super().__init__()
        self.net = _net()
        self.poison = False

    def forward(self, x, labels):
        loss = nn.functional.mse_loss(self.net(x), labels)
        return {"loss": loss * float("nan") if self.poison else loss}


class _Rows(torch.utils.data.Dataset):
    def __init__(self, n: int) -> None:
        self.x, self.y = _data(n)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.y[i]}


def _fsdp2_on_cpu(accelerator: Any, plugin: Any) -> None:
    """Accelerate picks FSDP only for GPU process groups; switch its CPU state to FSDP2,
    so that its FSDP2 code path (fully_shard, DTensor gradients) runs on gloo."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    state = AcceleratorState()
    state.distributed_type = DistributedType.FSDP
    state.fsdp_plugin = plugin
    PartialState().distributed_type = DistributedType.FSDP
    assert accelerator.is_fsdp2


def _reset_accelerate() -> None:
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def _transformers(rank: int, root: Path) -> dict[str, Any]:
    from accelerate.utils import FullyShardedDataParallelPlugin
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from gradguard.integrations.transformers import GradGuardTrainerCallback

    found: dict[str, Any] = {}
    for name in ("ddp", "fsdp2"):
        _reset_accelerate()
        model = _Regression()
        fsdp = {"fsdp": "full_shard", "fsdp_config": {"version": 2, "auto_wrap_policy": "NO_WRAP"}}
        args = TrainingArguments(
            output_dir=str(root / f"hf-{name}-{rank}"),
            max_steps=STEPS,
            per_device_train_batch_size=BATCH,
            learning_rate=LR,
            max_grad_norm=1.0,
            logging_steps=1,
            report_to=[],
            save_strategy="no",
            use_cpu=True,
            disable_tqdm=True,
            seed=0,
            **(fsdp if name == "fsdp2" else {}),
        )
        store = root / f"hf-{name}"
        callback = GradGuardTrainerCallback(
            monitor_only=False, store=store, log_every=1, health=False
        )
        skipped: list[bool] = []

        class Watch(TrainerCallback):
            """Poisons rank 1's batch at NAN_STEP; reads Accelerate's skip flag each step."""

            def on_step_begin(self, args, state, control, model=None, **kwargs):
                model.poison = rank == 1 and state.global_step + 1 == NAN_STEP

            def on_step_end(self, args, state, control, **kwargs):
                skipped.append(self.trainer.accelerator.optimizer_step_was_skipped)  # noqa: B023

        watch = Watch()
        trainer = watch.trainer = Trainer(
            model=model,
            args=args,
            train_dataset=_Rows(BATCH * 2 * STEPS),
            callbacks=[watch, callback],
        )
        if name == "fsdp2":
            trainer.is_fsdp_enabled = True
            _fsdp2_on_cpu(
                trainer.accelerator, FullyShardedDataParallelPlugin(**args.fsdp_plugin_args)
            )
        trainer.train()
        logged = [row["grad_norm"] for row in trainer.state.log_history if "grad_norm" in row]
        found[name] = {
            "logged": logged,  # the Trainer's grad_norm: gradguard's, at every step
            "skipped": skipped,
            "sharded": any(hasattr(p, "full_tensor") for p in model.parameters()),
            "params": [t.tolist() for t in _full(model.net.parameters())],
            "recording": callback._hook.guard.recorder.active if callback._hook else None,
            "stored": _stored(store, rank),
        }
    _reset_accelerate()
    return found


def _accelerate(rank: int, root: Path) -> dict[str, Any]:
    from accelerate import Accelerator
    from accelerate.utils import FullyShardedDataParallelPlugin

    from gradguard import Guard
    from gradguard.integrations.accelerate import guard_gradients

    x, y = _data(BATCH * 2 * STEPS * 2)
    found: dict[str, Any] = {}
    for name in ("ddp", "fsdp2"):
        _reset_accelerate()
        accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
        if name == "fsdp2":
            plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="NO_WRAP")
            _fsdp2_on_cpu(accelerator, plugin)
        model = _net()
        optimizer = torch.optim.Adam(model.parameters(), lr=LR)
        model, optimizer = accelerator.prepare(model, optimizer)
        store = root / f"accelerate-{name}"
        guard = Guard(model, _policy(), store=store, log_every=1, health=False)
        norms, skipped = [], []
        for micro in range(2 * STEPS):
            with accelerator.accumulate(model):
                rows = slice((2 * micro + rank) * BATCH, (2 * micro + rank + 1) * BATCH)
                loss = nn.functional.mse_loss(model(x[rows]), y[rows])
                if rank == 1 and micro // 2 + 1 == NAN_STEP:
                    loss = loss * float("nan")
                accelerator.backward(loss)
                result = guard_gradients(accelerator, guard, optimizer, loss=loss)
                optimizer.step()
                optimizer.zero_grad()
                if result is not None:
                    norms.append(float(result.total_norm))
                    skipped.append(accelerator.optimizer_step_was_skipped)
        guard.close()
        found[name] = {
            "norms": norms,
            "skipped": skipped,
            "sharded": any(hasattr(p, "full_tensor") for p in model.parameters()),
            "params": [t.tolist() for t in _full(model.parameters())],
            "recording": guard.recorder.active,
            "stored": _stored(store, rank),
        }
    _reset_accelerate()
    return found


# -- DeepSpeed: ZeRO stages 0-3 -------------------------------------------------------------


def _deepspeed(rank: int, world: int, root: Path, configs: list[tuple[int, str]]) -> dict:
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    from gradguard.integrations.deepspeed import DeepSpeedGuard

    # Without it the CPU accelerator JIT-compiles a shared-memory all-reduce (~100 s).
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    micro = 2
    x, y = _data(BATCH * world * micro * STEPS)

    def rows(m: int, r: int) -> slice:
        return slice((world * m + r) * BATCH, (world * m + r + 1) * BATCH)

    found: dict[str, Any] = {}
    for stage, precision in configs:
        config = {
            "train_micro_batch_size_per_gpu": BATCH,
            "gradient_accumulation_steps": micro,
            "gradient_clipping": 1.0,
            "zero_optimization": {"stage": stage},
            "steps_per_print": 10**9,
        }
        if precision == "bf16":
            config["bf16"] = {"enabled": True}
        model = _net()
        engine, *_ = deepspeed.initialize(
            model=model, optimizer=torch.optim.Adam(model.parameters(), lr=LR), config=config
        )
        store = root / f"deepspeed-{stage}-{precision}"
        guard = DeepSpeedGuard(engine, monitor_only=False, store=store, log_every=1, health=False)
        dtype = next(engine.module.parameters()).dtype
        norms, ds_norms, skipped, applied = [], [], [], []
        for m in range(micro * STEPS):
            loss = nn.functional.mse_loss(
                engine(x[rows(m, rank)].to(dtype)).float(), y[rows(m, rank)]
            )
            if rank == 1 and m // micro + 1 == NAN_STEP:
                loss = loss * float("nan")
            engine.backward(loss)
            result = guard.step(loss=loss)
            if result is not None:
                norms.append(float(result.total_norm))
                skipped.append(result.is_skipped())
                applied.append(engine.was_step_applied())
                norm = engine.get_global_grad_norm()
                ds_norms.append(math.nan if norm is None else float(norm))
        guard.close()
        params = engine.module.parameters()
        full = [safe_get_full_fp32_param(p) if stage else p.detach().float() for p in params]
        found[f"{stage}-{precision}"] = {
            "norms": norms,
            "ds_norms": ds_norms,
            "skipped": skipped,
            "applied": applied,
            "skipped_steps": engine.skipped_steps,
            "params": [t.tolist() for t in full],
            "recording": guard.guard.recorder.active,
            "stored": _stored(store, rank),
        }
        engine.destroy()
    # The unsharded reference: every rank's micro-batches in one process, the NaN step skipped.
    model = _net()
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    reference = []
    for step in range(STEPS):
        for m in range(step * micro, (step + 1) * micro):
            for r in range(world):
                loss = nn.functional.mse_loss(model(x[rows(m, r)]), y[rows(m, r)])
                (loss / (micro * world)).backward()
        reference.append(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0).item())
        if step + 1 != NAN_STEP:
            optimizer.step()
        optimizer.zero_grad()
    found["reference"] = reference
    found["reference_params"] = [p.detach().tolist() for p in model.parameters()]
    return found
