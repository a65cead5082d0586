"""Guarding at scale: gloo ranks on CPU, FSDP2 and DDP training steps, and DTensor norms.

Run by hand (never in CI)::

    nice python benchmarks/bench_distributed.py [--world 8] [--layers 500] [--steps 12]
    nice python benchmarks/bench_distributed.py --norms [--world 2] [--rounds 15]

**Training steps** (default). A residual stack of ``--layers`` small linear blocks
(``2 x layers`` parameter tensors) trains with AdamW on ``--world`` gloo ranks, once
under DDP and once under FSDP2 (``fully_shard`` on the root: every gradient is a
Shard(0) DTensor on one mesh). Each round runs one step of each candidate in turn:

* ``optimizer.step()``: no guard, the baseline;
* ``torch clip_grad_norm_``: torch's clip, then the step;
* ``guard.step``, default policy: skip non-finite steps + ZClip, recorded to a run store
  on rank 0 (``log_every=50``);
* ``guard.step``, ``ClipNorm(1.0)``, recorded the same way.

Rank 0 prints, per candidate, the median time of the whole step (forward, backward,
finish) and of the finish alone (what runs after ``backward()``), both between barriers,
so the slowest rank counts. It also prints the collectives each candidate's finish
issued through ``torch.distributed`` (calls and bytes this rank contributed per step),
counted by wrapping those functions for the duration of the finish: anything counted
there is gradguard's or torch's clip's (the optimizer communicates nothing). torch's
DTensor clip reduces through functional collectives, which this count does not see.

**Norm kernels** (``--norms``): hand-built Shard(0) DTensor gradients shaped like
GPT-2 small, ResNet-50 and a 1000-tensor MLP; the median time per call of
``torch.nn.utils.clip_grad_norm_``, ``gg.measure``, ``gg.clip_grad_norm_`` and
per-tensor ``full_tensor()`` norms.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))

MAX_NORM = 1e9  # never binding: the multiply still runs, values stay the same across rounds
#: The collectives counted (the functions of ``torch.distributed`` that move tensors).
COLLECTIVES = (
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "reduce_scatter_tensor",
    "broadcast",
    "all_to_all_single",
    "reduce",
    "gather",
    "scatter",
)


# -- counting collectives ------------------------------------------------------------------


def _nbytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (list, tuple)):
        return sum(_nbytes(v) for v in value)
    return 0


@contextlib.contextmanager
def count_collectives() -> Iterator[dict[str, list[int]]]:
    """Count calls through ``torch.distributed``'s collectives inside the block.

    Yields ``{name: [bytes of call 1, bytes of call 2, ...]}``; the bytes are those of the
    tensor this rank hands in (its input for all-reduce, its contribution for gathers).
    """
    calls: dict[str, list[int]] = {}
    originals = {name: getattr(dist, name) for name in COLLECTIVES}

    def counting(name: str, inner: Callable) -> Callable:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            # the tensor handed in: all_gather(out_list, tensor), reduce_scatter(out, in)
            sent = args[1] if name in ("all_gather", "all_gather_into_tensor") else args[0]
            if name == "reduce_scatter_tensor":
                sent = args[1]
            calls.setdefault(name, []).append(_nbytes(sent))
            return inner(*args, **kwargs)

        return wrapper

    try:
        for name, inner in originals.items():
            setattr(dist, name, counting(name, inner))
        yield calls
    finally:
        for name, inner in originals.items():
            setattr(dist, name, inner)


# -- the training-step benchmark -----------------------------------------------------------


class Block(nn.Module):
    """``x + tanh(linear(x))``: deep stacks of it keep a usable gradient."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.linear = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.tanh(self.linear(x))


def make_model(layers: int, width: int) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(*(Block(width) for _ in range(layers)))


def _wrap(kind: str, model: nn.Module) -> nn.Module:
    if kind == "ddp":
        return nn.parallel.DistributedDataParallel(model)
    from torch.distributed.fsdp import fully_shard

    fully_shard(model)  # the root only: one all-gather and one reduce-scatter per step
    return model


def _candidates(model: nn.Module, optimizer, store: str | None) -> dict[str, Callable[[], Any]]:
    import gradguard as gg

    def recorded(policy: gg.Policy | None, name: str) -> gg.Guard:
        run = None if store is None else os.path.join(store, name)
        return gg.Guard(model, policy, store=run, log_every=50, health=run is not None)

    default, clip = recorded(None, "default"), recorded(gg.ClipNorm(1.0), "clip")
    params = list(model.parameters())

    def torch_clip() -> None:
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()

    return {
        "optimizer.step() (no guard)": optimizer.step,
        "torch clip_grad_norm_ + step": torch_clip,
        "guard.step, default policy": lambda: default.step(optimizer),
        "guard.step, ClipNorm(1.0)": lambda: clip.step(optimizer),
    }


def _timed(fn: Callable[[], Any]) -> float:
    dist.barrier()
    start = time.perf_counter()
    fn()
    dist.barrier()
    return time.perf_counter() - start


def train_steps(rank: int, world: int, kind: str, cfg: dict) -> dict[str, Any]:
    """Time and count every candidate's steps under ``kind`` (``"ddp"`` or ``"fsdp2"``)."""
    model = _wrap(kind, make_model(cfg["layers"], cfg["width"]))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True)
    # every rank passes a store; only rank 0's recorder writes
    store = tempfile.mkdtemp(prefix=f"gg-bench-{kind}-") if cfg.get("record", True) else None
    candidates = _candidates(model, optimizer, store)
    gen = torch.Generator().manual_seed(1 + rank)
    batch = [torch.randn(cfg["batch"], cfg["width"], generator=gen) for _ in range(4)]
    step_s: dict[str, list[float]] = {name: [] for name in candidates}
    finish_s: dict[str, list[float]] = {name: [] for name in candidates}
    sent: dict[str, list[dict[str, list[int]]]] = {name: [] for name in candidates}
    for round_ in range(cfg["warmup"] + cfg["steps"]):
        for name, finish in candidates.items():
            optimizer.zero_grad(set_to_none=True)
            x = batch[round_ % len(batch)]
            dist.barrier()
            start_step = time.perf_counter()
            nn.functional.mse_loss(model(x), x).backward()
            with count_collectives() as calls:
                seconds = _timed(finish)
            if round_ >= cfg["warmup"]:
                step_s[name].append(time.perf_counter() - start_step)
                finish_s[name].append(seconds)
                sent[name].append(calls)
    params = list(model.parameters())
    return {
        "tensors": len(params),
        "numel": sum(p.numel() for p in params),
        "step_ms": {k: 1e3 * statistics.median(v) for k, v in step_s.items()},
        "finish_ms": {k: 1e3 * statistics.median(v) for k, v in finish_s.items()},
        "collectives": sent,
    }


def _train_worker(rank: int, world: int, port: int, cfg: dict, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")  # the health rules' findings on this synthetic task
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        found = {kind: train_steps(rank, world, kind, cfg) for kind in cfg["kinds"]}
        torch.save(found, os.path.join(out, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_training(world: int, **cfg: Any) -> list[dict[str, Any]]:
    """Spawn ``world`` gloo ranks; every rank's results (see :func:`train_steps`)."""
    cfg = {
        "layers": 500,
        "width": 8,
        "batch": 16,
        "steps": 12,
        "warmup": 2,
        "kinds": ("ddp", "fsdp2"),
        **cfg,
    }
    out = tempfile.mkdtemp(prefix="gg-bench-dist-")
    mp.spawn(_train_worker, args=(world, _free_port(), cfg, out), nprocs=world)
    return [torch.load(os.path.join(out, f"rank{r}.pt")) for r in range(world)]


def _print_training(world: int, found: list[dict[str, Any]]) -> None:
    print(f"torch {torch.__version__}, gloo, {world} ranks x 1 thread")
    for kind, res in found[0].items():
        print(f"\n{kind}: {res['tensors']} parameter tensors, {res['numel']} parameters")
        base = res["step_ms"]["optimizer.step() (no guard)"]
        base_finish = res["finish_ms"]["optimizer.step() (no guard)"]
        print(
            f"  {'candidate':30s} {'step ms':>9s} {'x':>6s} {'finish ms':>10s} {'x':>6s}  sent/step"
        )
        for name, ms in res["step_ms"].items():
            finish = res["finish_ms"][name]
            calls = res["collectives"][name]
            per_step = {op: sizes for op, sizes in calls[-1].items()}
            same = all(c == calls[-1] for c in calls)
            text = ", ".join(f"{op} {len(s)} x {sum(s)} B" for op, s in per_step.items())
            text = (text or "nothing") + ("" if same else " (varies by step)")
            print(
                f"  {name:30s} {ms:9.2f} {ms / base:6.2f} {finish:10.2f} "
                f"{finish / base_finish:6.2f}  {text}"
            )


# -- the norm-kernel benchmark (hand-built DTensor gradients) -------------------------------


def _norm_cases():
    from _shapes import gpt2_small_shapes, mlp_1000_shapes, resnet50_shapes

    return [
        ("GPT-2 small fp32", gpt2_small_shapes()),
        ("ResNet-50 fp32", resnet50_shapes()),
        ("MLP 1000 tensors fp32", mlp_1000_shapes()),
    ]


def _sharded(shapes, mesh):
    from torch.distributed.tensor import Shard, distribute_tensor

    gen = torch.Generator().manual_seed(0)
    total = sum(torch.Size(s).numel() for _, s in shapes)
    named = []
    for name, shape in shapes:
        full = torch.randn(shape, generator=gen) / total**0.5
        param = nn.Parameter(distribute_tensor(torch.zeros(shape), mesh, [Shard(0)]))
        param.grad = distribute_tensor(full, mesh, [Shard(0)])
        named.append((name, param))
    return named


def _norm_candidates(named, gg) -> dict[str, Callable[[], Any]]:
    params = [p for _, p in named]
    return {
        "torch.clip_grad_norm_": lambda: nn.utils.clip_grad_norm_(params, MAX_NORM),
        "gg.measure (per-tensor + total)": lambda: gg.measure(named),
        "gg.clip_grad_norm_": lambda: gg.clip_grad_norm_(params, MAX_NORM),
        "per-tensor full_tensor()": lambda: [
            torch.linalg.vector_norm(p.grad).full_tensor() for p in params
        ],
    }


def _norm_worker(rank: int, world: int, port: int, rounds: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from _timing import interleaved
    from torch.distributed.device_mesh import init_device_mesh

    import gradguard as gg

    mesh = init_device_mesh("cpu", (world,))
    if rank == 0:
        print(f"torch {torch.__version__}, gloo, {world} ranks x 1 thread, {rounds} rounds")
    for title, shapes in _norm_cases():
        named = _sharded(shapes, mesh)
        candidates = _norm_candidates(named, gg)
        counts = {}
        for name, fn in candidates.items():
            with count_collectives() as calls:
                fn()
            counts[name] = calls.get("all_reduce", [])
        times = interleaved(candidates, rounds)
        if rank == 0:
            base = times["torch.clip_grad_norm_"]
            print(f"\n{title}: {len(named)} tensors")
            for name, seconds in times.items():
                c = counts[name]
                sent = f"  all_reduce: {len(c)} x, {sum(c)} B" if name.startswith("gg") else ""
                print(f"  {name:34s} {seconds * 1e3:8.3f} ms  x{seconds / base:5.2f}{sent}")
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", type=int, default=None, help="ranks (8; 2 with --norms)")
    parser.add_argument("--layers", type=int, default=500, help="blocks: 2 tensors each")
    parser.add_argument("--width", type=int, default=8)
    parser.add_argument("--steps", type=int, default=12, help="timed rounds")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    parser.add_argument("--norms", action="store_true", help="the norm-kernel benchmark")
    parser.add_argument("--rounds", type=int, default=15, help="rounds of --norms")
    parser.add_argument("--json", type=Path, help="also write rank 0's training results here")
    args = parser.parse_args()
    if args.norms:
        world = args.world or 2
        mp.spawn(_norm_worker, args=(world, _free_port(), args.rounds), nprocs=world)
        return
    world = args.world or 8
    found = run_training(
        world, layers=args.layers, width=args.width, steps=args.steps, warmup=args.warmup
    )
    _print_training(world, found)
    if args.json:
        args.json.write_text(json.dumps(found[0], indent=1))


if __name__ == "__main__":
    main()
