"""What ``guard.step`` sends per training step under DDP and FSDP2 (gloo, 2 ranks).

Runs the harness of ``benchmarks/bench_distributed.py`` at a small size, so the byte
counts that benchmark prints at 8 ranks are checked here: under FSDP2 one all-reduce of
8 bytes (a float64 power) per parameter tensor and nothing else, whatever the policy;
under DDP nothing at all. The collectives are counted by wrapping the functions of
``torch.distributed`` while each candidate finishes its step.
"""

from __future__ import annotations

import functools

import pytest
import torch.distributed as dist

from benchmarks import bench_distributed as bench

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed missing")
LAYERS = 12  # two tensors each
GUARDED = ("guard.step, default policy", "guard.step, ClipNorm(1.0)")


@functools.cache
def found() -> list[dict]:
    return bench.run_training(2, layers=LAYERS, width=8, steps=2, warmup=1)


@pytest.mark.parametrize("candidate", GUARDED)
def test_fsdp2_guard_sends_one_all_reduce_of_8_bytes_per_tensor(candidate):
    for rank in found():
        fsdp = rank["fsdp2"]
        assert fsdp["tensors"] == 2 * LAYERS
        steps = fsdp["collectives"][candidate]
        assert len(steps) == 2
        assert steps == [{"all_reduce": [8 * 2 * LAYERS]}] * 2


@pytest.mark.parametrize("candidate", GUARDED)
def test_ddp_guard_sends_nothing(candidate):
    for rank in found():
        assert rank["ddp"]["collectives"][candidate] == [{}, {}]


def test_unguarded_step_sends_nothing_so_the_count_is_the_guards():
    for rank in found():
        for kind in ("ddp", "fsdp2"):
            assert rank[kind]["collectives"]["optimizer.step() (no guard)"] == [{}, {}]
