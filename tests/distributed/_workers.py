"""Multi-process scenarios for the distributed tests (gloo on CPU, 127.0.0.1).

Each world size is spawned once per pytest process (:func:`results`); every rank runs
all scenarios and saves what it saw, and the tests compare ranks with each other and with
a single-process reference computed on the same data. Spawning costs most of the time,
so the scenarios are batched into one spawn per world size.
"""

from __future__ import annotations

import copy
import functools
import math
import os
import socket
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

TIMEOUT_S = 240
BATCH_PER_RANK = 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@functools.cache
def results(world: int) -> list[dict[str, Any]]:
    """Run every scenario on ``world`` gloo ranks; return each rank's findings (by rank)."""
    return run_ranks(_entry, world, "gg-dist", TIMEOUT_S)


def run_ranks(entry: Any, world: int, prefix: str, timeout_s: float) -> list[dict[str, Any]]:
    """Spawn ``entry(rank, world, port, out)`` on ``world`` processes; each rank saves its
    findings to ``out/rank<r>.pt`` (a dict, with ``"error"`` when it failed)."""
    out = Path(tempfile.mkdtemp(prefix=f"{prefix}{world}-"))
    port = _free_port()
    ctx = mp.start_processes(
        entry, args=(world, port, str(out)), nprocs=world, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + timeout_s
    exit_problem: Exception | None = None
    try:
        while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{world}-rank run did not finish in {timeout_s}s")
    except mp.ProcessExitedException as error:
        exit_problem = error
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
                p.join(5)
    files = [out / f"rank{r}.pt" for r in range(world)]
    if exit_problem is not None and not all(f.exists() for f in files):
        raise exit_problem
    if exit_problem is not None:
        # Every rank saved its findings; gloo sometimes aborts in process teardown.
        warnings.warn(f"a rank exited badly after saving: {exit_problem}", stacklevel=2)
    found = [torch.load(f, weights_only=False) for f in files]
    errors = [f"rank {r} failed:\n{f['error']}" for r, f in enumerate(found) if "error" in f]
    if errors:
        raise AssertionError("\n".join(errors))
    return found


def _entry(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    dist.init_process_group("gloo", rank=rank, world_size=world)
    found: dict[str, Any] = {}
    try:
        found["ddp"] = _ddp(rank, world, Path(out))
        found["fsdp"] = _fsdp(rank, world)
        found["meshes"] = _meshes(rank, world)
        if world == 4:
            found["fsdp_tp"] = _fsdp_tp(rank)
    except Exception:
        found = {"error": traceback.format_exc()}
    torch.save(found, Path(out) / f"rank{rank}.pt")
    if "error" not in found:
        dist.barrier()
    dist.destroy_process_group()


# -- shared pieces -------------------------------------------------------------------------


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4)
    )


def _adaptive() -> Any:
    """Skip non-finite steps and clip spikes with ZClip after a 3-step warm-up."""
    from gradguard.policies import SkipNonFinite, ZClip, chain

    return chain(SkipNonFinite(), ZClip(warmup_steps=3))


def _batch(step: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch of ``step`` (identical on every rank); rank r uses its slice."""
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(world * BATCH_PER_RANK, 8, generator=g)
    return x, torch.randn(world * BATCH_PER_RANK, 4, generator=g)


def _slice(t: torch.Tensor, rank: int) -> torch.Tensor:
    return t[rank * BATCH_PER_RANK : (rank + 1) * BATCH_PER_RANK]


def _loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.mse_loss(model(x), y)


def _reference(step: int, world: int, p: float = 2.0, micro: int = 1) -> Any:
    """Single-process measurement on the whole global batch (micro-batches accumulated)."""
    import gradguard

    model = _model()
    for m in range(micro):
        x, y = _batch(step + m, world)
        (_loss(model, x, y)).backward()
    return gradguard.measure(model, p, max_abs=True, zero_fraction=True)


def _state_tensors(state: Any) -> list[float]:
    """Flatten a policy state_dict to numbers, to compare ranks exactly."""
    if isinstance(state, torch.Tensor):
        return state.double().flatten().tolist()
    if isinstance(state, dict):
        return [v for k in sorted(state) for v in _state_tensors(state[k])]
    if isinstance(state, (list, tuple)):
        return [v for s in state for v in _state_tensors(s)]
    if isinstance(state, (int, float, bool)):
        return [float(state)]
    return []


def _decisions(results: list[Any]) -> list[tuple[float, float, bool]]:
    return [(float(r.total_norm), float(r.clip_coef), bool(r.skipped)) for r in results]


class CountAllReduce:
    """Count ``torch.distributed.all_reduce`` calls and the elements they carry."""

    def __enter__(self) -> list[tuple[int, str]]:
        self.calls: list[tuple[int, str]] = []
        self.original = dist.all_reduce

        def counted(tensor, *args, **kwargs):
            self.calls.append((tensor.numel(), str(tensor.dtype)))
            return self.original(tensor, *args, **kwargs)

        dist.all_reduce = counted
        return self.calls

    def __exit__(self, *exc: object) -> None:
        dist.all_reduce = self.original


def _full(params: Any) -> list[torch.Tensor]:
    from torch.distributed.tensor import DTensor

    return [(p.full_tensor() if isinstance(p, DTensor) else p).detach().clone() for p in params]


# -- DDP ----------------------------------------------------------------------------------


def _ddp(rank: int, world: int, out: Path) -> dict[str, Any]:
    import gradguard
    from gradguard.distributed import watch_ddp
    from gradguard.policies import ClipNorm, SkipNonFinite, chain
    from gradguard.record import RunStore

    found: dict[str, Any] = {}
    ddp = nn.parallel.DistributedDataParallel(_model())
    watch = watch_ddp(ddp)
    model = ddp.module
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    store = out / f"ddp-run-rank{rank}"
    guard = gradguard.Guard(model, chain(SkipNonFinite(), ClipNorm(0.5)), store=store, log_every=2)

    # 1. accumulation: micro-batch 0 under no_sync is not measured; the synced one is.
    x, y = _batch(0, world)
    with ddp.no_sync(), guard.accumulating():
        _loss(ddp, _slice(x, rank), _slice(y, rank)).backward()
        found["no_sync_result"] = guard.step(opt)
        found["no_sync_hook_ran"] = watch.nonfinite is not None
    x, y = _batch(1, world)
    _loss(ddp, _slice(x, rank), _slice(y, rank)).backward()
    stats = gradguard.measure(model.named_parameters(), max_abs=True, zero_fraction=True)
    ref = _reference(0, world, micro=2)
    found["measured"] = _pack(stats)
    found["reference"] = _pack(ref)
    found["step0"] = _decisions([guard.step(opt)])[0]
    ref_model = _model()
    for m in range(2):
        bx, by = _batch(m, world)
        _loss(ref_model, bx, by).backward()
    found["ref_norm"] = float(torch.nn.utils.clip_grad_norm_(ref_model.parameters(), 0.5))
    torch.optim.SGD(ref_model.parameters(), lr=0.05).step()
    found["clip_update_err"] = max(
        float((a - r).abs().max() / r.abs().max())
        for a, r in zip(model.parameters(), ref_model.parameters())
    )
    opt.zero_grad()

    # 2. a NaN on the last rank only: every rank skips, parameters stay as they were.
    x, y = _batch(2, world)
    xs = _slice(x, rank).clone()
    if rank == world - 1:
        xs[0, 0] = math.nan
    before = _full(model.parameters())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _loss(ddp, xs, _slice(y, rank)).backward()
        result = guard.step(opt)
    found["nan_skipped"] = bool(result.skipped)
    found["nan_unchanged"] = all(
        torch.equal(b, p) for b, p in zip(before, _full(model.parameters()))
    )
    found["nan_warning"] = [str(w.message) for w in caught]
    opt.zero_grad()
    guard.close()
    found["store_exists"] = store.exists()
    if rank == 0:
        events = RunStore.open(store).events("skip")
        found["skip_events"] = [(e.step, e.data) for e in events]

    # 3. adaptive policy over several steps, then a resume from rank 0's state_dict.
    ddp2 = nn.parallel.DistributedDataParallel(_model())
    model2 = ddp2.module
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.05, momentum=0.9)
    guard2 = gradguard.Guard(model2, _adaptive(), health=False)
    decisions, states = [], []
    checkpoint = None
    for step in range(12):
        if step == 6:
            checkpoint = (
                copy.deepcopy(model2.state_dict()),
                copy.deepcopy(opt2.state_dict()),
                [guard2.state_dict()] if rank == 0 else [None],
            )
        x, y = _batch(10 + step, world)
        scale = 40.0 if step in (4, 8) else 1.0  # two spikes, so ZClip acts
        _loss(ddp2, _slice(x, rank) * scale, _slice(y, rank)).backward()
        decisions.append(_decisions([guard2.step(opt2)])[0])
        states.append(_state_tensors(guard2.policy.state_dict()))
        opt2.zero_grad()
    found["adaptive_decisions"] = decisions
    found["adaptive_states"] = states

    assert checkpoint is not None
    model_state, opt_state, guard_state = checkpoint
    dist.broadcast_object_list(guard_state, src=0)
    ddp3 = nn.parallel.DistributedDataParallel(_model())
    ddp3.module.load_state_dict(model_state)
    opt3 = torch.optim.SGD(ddp3.module.parameters(), lr=0.05, momentum=0.9)
    opt3.load_state_dict(opt_state)
    guard3 = gradguard.Guard(ddp3.module, _adaptive(), health=False)
    guard3.load_state_dict(guard_state[0])
    resumed = []
    for step in range(6, 12):
        x, y = _batch(10 + step, world)
        scale = 40.0 if step in (4, 8) else 1.0
        _loss(ddp3, _slice(x, rank) * scale, _slice(y, rank)).backward()
        resumed.append(_decisions([guard3.step(opt3)])[0])
        opt3.zero_grad()
    found["resumed_decisions"] = resumed
    return found


def _pack(stats: Any) -> dict[str, Any]:
    host = stats.to_host()
    return {
        "total": host.total_norm,
        "norms": host.norms,
        "names": stats.names,
        "shapes": [tuple(s) for s in stats.shapes],
        "max_abs": host.max_abs,
        "zero_fraction": host.zero_fraction,
    }


# -- FSDP2 ---------------------------------------------------------------------------------


def _fsdp(rank: int, world: int) -> dict[str, Any]:
    from torch.distributed.fsdp import fully_shard

    import gradguard
    from gradguard.functional import clip_grad_value_, clip_tensor_norms_
    from gradguard.policies import ClipNorm, ClipTensorNorm, ClipValue, SkipNonFinite, chain

    found: dict[str, Any] = {}

    def sharded() -> nn.Module:
        model = _model()
        for layer in model:
            if isinstance(layer, nn.Linear):
                fully_shard(layer)
        fully_shard(model)
        return model

    model = sharded()
    found["grad_types"] = sorted({type(p).__name__ for p in model.parameters()})
    x, y = _batch(0, world)
    _loss(model, _slice(x, rank), _slice(y, rank)).backward()
    for p in (2.0, 1.0, 3.0, math.inf):
        with CountAllReduce() as calls:
            stats = gradguard.measure(model, p)
        found[f"calls_p{p}"] = calls
        stats = gradguard.measure(model, p, max_abs=True, zero_fraction=True)
        found[f"measured_p{p}"] = _pack(stats)
        found[f"reference_p{p}"] = _pack(_reference(0, world, p))

    # Guard.step with a clip that acts: the update must equal the single-process one.
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = gradguard.Guard(model, chain(SkipNonFinite(), ClipNorm(0.05)), health=False)
    result = guard.step(opt)
    found["clip_decision"] = _decisions([result])[0]
    ref = _model()
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    _loss(ref, x, y).backward()
    found["ref_norm"] = float(torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.05))
    ref_opt.step()
    after = _full(model.parameters())
    found["clip_update_err"] = max(
        float((a - r).abs().max() / r.abs().max()) for a, r in zip(after, ref.parameters())
    )
    opt.zero_grad()

    # Per-tensor scales (through the local shards) and an element-wise transform (on
    # the DTensors; with a recorder attached the clipped norm is then re-measured, a
    # second collective on every rank; only rank 0's recorder writes, here nowhere).
    for label, policy, clip in (
        ("tensor_norm", ClipTensorNorm(0.05), lambda m: clip_tensor_norms_(m, 0.05)),
        ("value", ClipValue(0.01), lambda m: clip_grad_value_(m.parameters(), 0.01)),
    ):
        recorder = gradguard.Recorder(store=False, rank=rank)
        clip_guard = gradguard.Guard(model, policy, recorder=recorder, health=False)
        ref = _model()
        ref.load_state_dict({k: v.full_tensor() for k, v in model.state_dict().items()})
        x, y = _batch(5, world)
        _loss(model, _slice(x, rank), _slice(y, rank)).backward()
        result = clip_guard.step(opt)
        _loss(ref, x, y).backward()
        clip(ref)
        found[f"{label}_clipped_norm"] = float(result.clipped_norm)
        found[f"{label}_ref_clipped_norm"] = float(gradguard.measure(ref).total_norm)
        torch.optim.SGD(ref.parameters(), lr=0.1).step()
        found[f"{label}_update_err"] = max(
            float((a - r).abs().max() / r.abs().max())
            for a, r in zip(_full(model.parameters()), ref.parameters())
        )
        opt.zero_grad()

    # NaN on the last rank: all skip, parameters unchanged everywhere.
    x, y = _batch(1, world)
    xs = _slice(x, rank).clone()
    if rank == world - 1:
        xs[1, 2] = math.nan
    before = _full(model.parameters())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _loss(model, xs, _slice(y, rank)).backward()
        result = guard.step(opt)
    found["nan_skipped"] = bool(result.skipped)
    found["nan_unchanged"] = all(
        torch.equal(b, a) for b, a in zip(before, _full(model.parameters()))
    )
    found["nan_warning"] = [str(w.message) for w in caught]
    found["nan_local"] = bool(result.stats.local_nonfinite)
    opt.zero_grad()

    # Adaptive policy: identical decisions and state on every rank.
    model = sharded()
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    guard = gradguard.Guard(model, _adaptive(), health=False)
    decisions, states = [], []
    for step in range(8):
        x, y = _batch(20 + step, world)
        scale = 30.0 if step == 5 else 1.0
        _loss(model, _slice(x, rank) * scale, _slice(y, rank)).backward()
        decisions.append(_decisions([guard.step(opt)])[0])
        states.append(_state_tensors(guard.policy.state_dict()))
        opt.zero_grad()
    found["adaptive_decisions"] = decisions
    found["adaptive_states"] = states

    # The functional drop-ins on DTensor grads: clipped grads equal single-process ones.
    for label, clip in (
        ("fn_clip_grad_norm", lambda m: gradguard.clip_grad_norm_(m.parameters(), 0.05)),
        ("fn_clip_tensor_norms", lambda m: clip_tensor_norms_(m, 0.05)),
    ):
        model = sharded()
        ref = _model()
        x, y = _batch(30, world)
        _loss(model, _slice(x, rank), _slice(y, rank)).backward()
        _loss(ref, x, y).backward()
        clip(model)
        clip(ref)
        found[f"{label}_err"] = max(
            float((a.grad.full_tensor() - r.grad).abs().max() / r.grad.abs().max())
            for a, r in zip(model.parameters(), ref.parameters())
        )
    return found


# -- DTensor on several meshes -------------------------------------------------------------


def _meshes(rank: int, world: int) -> dict[str, Any]:
    """Hand-built DTensor gradients on a 1-D world mesh and, for 4 ranks, a 2-D mesh and
    one of its 1-D sub-meshes, plus a plain (replicated) tensor; compared with the norms of
    the full tensors."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

    import gradguard
    from gradguard.stats import measure_grads

    g = torch.Generator().manual_seed(7)
    line = init_device_mesh("cpu", (world,))
    specs: list[tuple[str, Any, list, tuple[int, ...]]] = [
        ("row", line, [Shard(0)], (7, 5)),
        ("col", line, [Shard(1)], (3, 9)),
        ("tiny", line, [Shard(0)], (world - 1,)),  # one rank holds an empty shard
        ("rep", line, [Replicate()], (4, 4)),
    ]
    if world == 4:
        grid = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
        specs += [
            ("dp_only", grid, [Shard(0), Replicate()], (6, 3)),
            ("tp_only", grid, [Replicate(), Shard(1)], (5, 6)),
            ("both", grid, [Shard(0), Shard(1)], (4, 6)),
            ("sub", grid["tp"], [Shard(0)], (5, 2)),
        ]
        # A 2-D mesh over half the ranks: reduced over each of its dimensions in turn.
        cube = init_device_mesh("cpu", (2, 1, 2), mesh_dim_names=("a", "b", "c"))
        half = cube["a", "b"]
        specs.append(("sub2d", half, [Shard(0), Replicate()], (6, 2)))
        specs.append(("sub2d_rep", half, [Replicate(), Shard(0)], (3, 3)))
    fulls = [torch.randn(*shape, generator=g) for *_, shape in specs]
    plain_full = torch.randn(3, generator=g)
    params = []
    for (name, mesh, placements, _), full in zip(specs, fulls):
        param = nn.Parameter(distribute_tensor(torch.zeros_like(full), mesh, placements))
        param.grad = distribute_tensor(full.clone(), mesh, placements)
        params.append((name, param))
    plain = nn.Parameter(torch.zeros(3))
    plain.grad = plain_full.clone()
    params.append(("plain", plain))
    fulls.append(plain_full)

    found: dict[str, Any] = {"names": [n for n, _ in params]}
    for p in (2.0, 1.0, 3.0, math.inf):
        found[f"measured_p{p}"] = _pack(gradguard.measure(params, p, max_abs=True))
        with CountAllReduce() as calls:
            gradguard.measure(params, p)
        found[f"calls_p{p}"] = calls
        names = [n for n, _ in params]
        found[f"reference_p{p}"] = _pack(measure_grads(fulls, p, names=names, max_abs=True))
    # A NaN in one rank's shard of "row": only that tensor (and the total) is non-finite.
    row = params[0][1].grad.to_local()
    if rank == world - 1:
        row.view(-1)[0] = math.nan
    stats = gradguard.measure(params)
    found["nan_flags"] = stats.nonfinite.tolist()
    found["nan_total"] = float(stats.total_norm)
    found["nan_local"] = bool(stats.local_nonfinite)
    # inf norm keeps the NaN too (MAX alone may drop it).
    found["nan_inf_norm"] = gradguard.measure(params, math.inf).norms.tolist()
    # A gradient with a pending reduction has no norm yet: a clear error naming it.
    pending = nn.Parameter(distribute_tensor(torch.zeros(4), line, [Replicate()]))
    pending.grad = DTensor.from_local(torch.ones(4), line, [Partial()])
    try:
        gradguard.measure([("pending", pending)])
    except ValueError as error:
        found["partial_error"] = str(error)
    return found


# -- FSDP2 x tensor parallel on a 2-D mesh (4 ranks) ---------------------------------------


def _fsdp_tp(rank: int) -> dict[str, Any]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    import gradguard

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    dp = mesh.get_local_rank("dp")
    model = _model()
    parallelize_module(model, mesh["tp"], {"0": ColwiseParallel(), "2": RowwiseParallel()})
    fully_shard(model, mesh=mesh["dp"])
    x, y = _batch(0, 2)  # two data-parallel slices
    _loss(model, _slice(x, dp), _slice(y, dp)).backward()
    found: dict[str, Any] = {
        "placements": [str(p.grad.placements) for p in model.parameters()],
    }
    for p in (2.0, math.inf):
        found[f"measured_p{p}"] = _pack(gradguard.measure(model, p))
        found[f"reference_p{p}"] = _pack(_reference(0, 2, p))
    return found
