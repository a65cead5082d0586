"""DeepSpeedMonitor with a real DeepSpeed engine on CPU (one process, gloo on 127.0.0.1)."""

from __future__ import annotations

import importlib
import socket

import pytest
import torch
from torch import nn

deepspeed = pytest.importorskip("deepspeed")
ds_comm_torch = importlib.import_module("deepspeed.comm.torch")  # not deepspeed.comm's "torch"

from gradguard import RunStore  # noqa: E402
from gradguard.integrations.deepspeed import DeepSpeedMonitor  # noqa: E402

torch.set_num_threads(1)
ACCUMULATE, BATCH, STEPS, CLIP = 2, 4, 4, 1.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def single_process():
    """One process group for the module: DeepSpeed keeps global groups across engines."""
    with pytest.MonkeyPatch.context() as patch:
        # The CPU accelerator would JIT-compile its shared-memory all-reduce (~100 s): an
        # optional fast path that one process does not need.
        patch.setattr(ds_comm_torch, "build_shm_op", lambda: None)
        env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
        for key, value in {**env, "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}.items():
            patch.setenv(key, value)
        yield
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH * ACCUMULATE * STEPS, 6, generator=g)
    return x, (x[:, :1] * 3).tanh() + 0.1 * torch.randn(len(x), 1, generator=g)


def net() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 1))


def torch_run():
    model = net()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    x, y = data()
    norms = []
    for start in range(0, len(x), BATCH * ACCUMULATE):
        for j in range(ACCUMULATE):
            sl = slice(start + j * BATCH, start + (j + 1) * BATCH)
            (nn.functional.mse_loss(model(x[sl]), y[sl]) / ACCUMULATE).backward()
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP).item())
        optimizer.step()
        optimizer.zero_grad()
    return norms, model


@pytest.mark.parametrize("stage", [0, 2])
def test_monitor_records_pre_clip_norms_and_deepspeed_clips(tmp_path, single_process, stage):
    model = net()
    config = {
        "train_micro_batch_size_per_gpu": BATCH,
        "gradient_accumulation_steps": ACCUMULATE,
        "gradient_clipping": CLIP,
        "zero_optimization": {"stage": stage},
        "steps_per_print": 10**9,
    }
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    monitor = DeepSpeedMonitor(engine, store=tmp_path / "run", log_every=1)
    x, y = data()
    measured = []
    for i in range(0, len(x), BATCH):
        loss = nn.functional.mse_loss(engine(x[i : i + BATCH]), y[i : i + BATCH])
        engine.backward(loss)
        stats = monitor.step(loss=loss)
        if stats is not None:
            measured.append(stats.total_norm.item())
    monitor.close()

    expected, reference = torch_run()
    assert measured == pytest.approx(expected, rel=1e-5)
    assert max(expected) > CLIP  # DeepSpeed clipped some steps
    for got, want in zip(engine.module.parameters(), reference.parameters()):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    steps = RunStore.open(tmp_path / "run").steps()
    assert list(steps["step"]) == list(range(STEPS))
    assert list(steps["total_norm"]) == pytest.approx(expected, rel=1e-5)
    coef = [min(1.0, CLIP / (n + 1e-6)) for n in expected]
    assert list(steps["clip_coef"]) == pytest.approx(coef, rel=1e-5)
    assert not steps["skipped"].any()


def test_bad_engine_and_arguments_are_named():
    with pytest.raises(TypeError, match="engine"):
        DeepSpeedMonitor(nn.Linear(2, 2))
