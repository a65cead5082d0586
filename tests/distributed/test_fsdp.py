"""FSDP2 (fully_shard), hand-built DTensors on several meshes, FSDP2 x tensor parallel.

gloo on 2 and 4 CPU ranks; norms are compared with a single-process reference on the
same data. The processes are shared with tests/distributed/test_ddp.py (one spawn per
world size).
"""

from __future__ import annotations

import math

import pytest
import torch.distributed as dist

from tests.distributed._workers import results
from tests.distributed.test_ddp import REL, all_close, close

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed missing")
WORLDS = [2, 4]
NORMS = [1.0, 2.0, 3.0, math.inf]


def assert_matches(got: dict, ref: dict, extras: tuple[str, ...] = ()) -> None:
    assert got["names"] == ref["names"]
    assert got["shapes"] == ref["shapes"]
    assert close(got["total"], ref["total"]), (got["total"], ref["total"])
    assert all_close(got["norms"], ref["norms"]), (got["norms"], ref["norms"])
    for key in extras:
        assert all_close(got[key], ref[key]), key


@pytest.mark.parametrize("world", WORLDS)
def test_fsdp2_norms_equal_single_process(world):
    for found in results(world):
        fsdp = found["fsdp"]
        assert fsdp["grad_types"] == ["DTensor"]
        for p in NORMS:
            assert_matches(
                fsdp[f"measured_p{p}"], fsdp[f"reference_p{p}"], ("max_abs", "zero_fraction")
            )


@pytest.mark.parametrize("world", WORLDS)
def test_fsdp2_measure_is_one_small_all_reduce(world):
    for found in results(world):
        fsdp = found["fsdp"]
        n = len(fsdp["reference_p2.0"]["norms"])
        for p in (1.0, 2.0, 3.0):
            assert fsdp[f"calls_p{p}"] == [(n, "torch.float64")]  # n powers, whatever R
        assert fsdp["calls_pinf"] == [(2 * n, "torch.float64")]  # maxima and NaN flags


@pytest.mark.parametrize("world", WORLDS)
def test_fsdp2_guard_clip_updates_like_single_process(world):
    for found in results(world):
        total, coef, skipped = found["fsdp"]["clip_decision"]
        assert close(total, found["fsdp"]["ref_norm"])
        assert coef < 1.0 and not skipped
        assert found["fsdp"]["clip_update_err"] < REL


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("label", ["tensor_norm", "value"])
def test_fsdp2_per_tensor_and_value_clips_update_like_single_process(world, label):
    for found in results(world):
        fsdp = found["fsdp"]
        assert close(fsdp[f"{label}_clipped_norm"], fsdp[f"{label}_ref_clipped_norm"])
        assert fsdp[f"{label}_update_err"] < REL


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("label", ["fn_clip_grad_norm", "fn_clip_tensor_norms"])
def test_functional_clips_on_dtensor_grads_equal_single_process(world, label):
    for found in results(world):
        assert found["fsdp"][f"{label}_err"] < REL


@pytest.mark.parametrize("world", WORLDS)
def test_fsdp2_nan_on_one_rank_skips_everywhere(world):
    runs = [found["fsdp"] for found in results(world)]
    for fsdp in runs:
        assert fsdp["nan_skipped"] is True
        assert fsdp["nan_unchanged"] is True
        assert any("skipped (nonfinite)" in w and "rank(s)" in w for w in fsdp["nan_warning"])
    assert any(fsdp["nan_local"] for fsdp in runs)


@pytest.mark.parametrize("world", WORLDS)
def test_fsdp2_adaptive_decisions_and_state_identical_on_all_ranks(world):
    runs = [found["fsdp"] for found in results(world)]
    assert any(coef < 1.0 for _, coef, _ in runs[0]["adaptive_decisions"])
    for other in runs[1:]:
        assert other["adaptive_decisions"] == runs[0]["adaptive_decisions"]
        assert other["adaptive_states"] == runs[0]["adaptive_states"]


@pytest.mark.parametrize("world", WORLDS)
def test_dtensor_grads_on_several_meshes_equal_full_tensor_norms(world):
    for found in results(world):
        meshes = found["meshes"]
        if world == 4:  # 2-D mesh placements and a sub-mesh are part of the set
            multi = {"dp_only", "tp_only", "both", "sub", "sub2d", "sub2d_rep"}
            assert multi <= set(meshes["names"])
        for p in NORMS:
            assert_matches(meshes[f"measured_p{p}"], meshes[f"reference_p{p}"], ("max_abs",))
        # grouped by mesh: 1-D world mesh (4 tensors); for 4 ranks also the 2-D mesh
        # (3 tensors, one all-reduce over the world), its "tp" sub-mesh (1 tensor) and a
        # 2-D mesh over half the ranks (2 tensors, one all-reduce per mesh dimension).
        expected = [4] if world == 2 else [4, 3, 1, 2, 2]
        assert [numel for numel, _ in meshes["calls_p2.0"]] == expected
        assert [numel for numel, _ in meshes["calls_pinf"]] == [2 * k for k in expected]


@pytest.mark.parametrize("world", WORLDS)
def test_nan_in_one_shard_flags_that_tensor_on_every_rank(world):
    for rank, found in enumerate(results(world)):
        meshes = found["meshes"]
        assert meshes["nan_flags"] == [True] + [False] * (len(meshes["names"]) - 1)
        assert math.isnan(meshes["nan_total"])
        assert math.isnan(meshes["nan_inf_norm"][0])
        assert all(math.isfinite(v) for v in meshes["nan_inf_norm"][1:])
        assert meshes["nan_local"] is (rank == world - 1)


@pytest.mark.parametrize("world", WORLDS)
def test_pending_partial_gradient_is_a_clear_error(world):
    for found in results(world):
        message = found["meshes"]["partial_error"]
        assert "'pending'" in message and "pending reduction" in message


def test_fsdp2_with_tensor_parallel_on_2d_mesh_equals_single_process():
    for found in results(4):
        tp = found["fsdp_tp"]
        assert any(p.count("Shard") == 2 for p in tp["placements"])  # really 2-D sharded
        for p in (2.0, math.inf):
            assert_matches(tp[f"measured_p{p}"], tp[f"reference_p{p}"])
