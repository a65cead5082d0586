"""Norms of DTensor (FSDP2-style, Shard(0)) gradients across gloo ranks on CPU.

Run by hand: ``python benchmarks/bench_distributed.py [--world 2] [--rounds 15]``.
Every rank holds the Shard(0) shards of a model's gradients on a 1-D mesh; rank 0 prints
the median time per call of:

* ``torch.clip_grad_norm_``: torch's own DTensor path (total norm only), the baseline;
* ``gg.measure``: gradguard's exact per-tensor and total norms, one all-reduce;
* ``gg.clip_grad_norm_``: the drop-in clip, on the same one all-reduce;
* ``per-tensor full_tensor()``: per-parameter norms the plain way, one all-reduce each.

For gradguard's candidates it also prints the all-reduces (calls through
``torch.distributed.all_reduce``) and their bytes per call; torch's DTensor path
reduces through functional collectives, which this count does not see.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).parent))

MAX_NORM = 1e9  # never binding: the multiply still runs, values stay the same across rounds


def _cases():
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
        param = torch.nn.Parameter(distribute_tensor(torch.zeros(shape), mesh, [Shard(0)]))
        param.grad = distribute_tensor(full, mesh, [Shard(0)])
        named.append((name, param))
    return named


def _per_tensor_full(params):
    return [torch.linalg.vector_norm(p.grad).full_tensor() for p in params]


def _candidates(named, gg):
    params = [p for _, p in named]
    return {
        "torch.clip_grad_norm_": lambda: torch.nn.utils.clip_grad_norm_(params, MAX_NORM),
        "gg.measure (per-tensor + total)": lambda: gg.measure(named),
        "gg.clip_grad_norm_": lambda: gg.clip_grad_norm_(params, MAX_NORM),
        "per-tensor full_tensor()": lambda: _per_tensor_full(params),
    }


class _Count:
    def __init__(self):
        self.calls = self.bytes = 0
        self._inner = dist.all_reduce

    def __call__(self, tensor, *args, **kwargs):
        self.calls += 1
        self.bytes += tensor.numel() * tensor.element_size()
        return self._inner(tensor, *args, **kwargs)


def _worker(rank, world, port, rounds):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from _timing import interleaved
    from torch.distributed.device_mesh import init_device_mesh

    import gradguard as gg

    mesh = init_device_mesh("cpu", (world,))
    if rank == 0:
        print(f"torch {torch.__version__}, gloo, {world} ranks x 1 thread, {rounds} rounds")
    for title, shapes in _cases():
        named = _sharded(shapes, mesh)
        candidates = _candidates(named, gg)
        counts = {}
        for name, fn in candidates.items():
            counter = _Count()
            dist.all_reduce = counter
            try:
                fn()
            finally:
                dist.all_reduce = counter._inner
            counts[name] = counter
        times = interleaved(candidates, rounds)
        if rank == 0:
            base = times["torch.clip_grad_norm_"]
            print(f"\n{title}: {len(named)} tensors")
            for name, seconds in times.items():
                c = counts[name]
                sent = f"  all_reduce: {c.calls} x, {c.bytes} B" if name.startswith("gg") else ""
                print(f"  {name:34s} {seconds * 1e3:8.3f} ms  x{seconds / base:5.2f}{sent}")
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(args.world, port, args.rounds), nprocs=args.world)


if __name__ == "__main__":
    main()
