"""One process group per DeepSpeed test scope, forgotten by DeepSpeed when it ends."""

from __future__ import annotations

import importlib
import socket

import pytest
import torch

#: DeepSpeed's module-level caches of process groups, which outlive a destroyed group.
_CACHES = {
    "deepspeed.comm.comm": ("cdb",),
    "deepspeed.utils.groups": ("_WORLD_GROUP", "_DATA_PARALLEL_GROUP", "_MODEL_PARALLEL_GROUP"),
}


def isolate(patch: pytest.MonkeyPatch) -> None:
    """Run DeepSpeed on one CPU process in ``patch``'s scope; undone with ``patch``.

    The CPU accelerator would JIT-compile its shared-memory all-reduce first (~100 s), an
    optional fast path that one process does not need.
    """
    patch.setattr(importlib.import_module("deepspeed.comm.torch"), "build_shm_op", lambda: None)
    for module, names in _CACHES.items():
        loaded = importlib.import_module(module)
        for name in names:
            patch.setattr(loaded, name, getattr(loaded, name))  # restored when patch undoes
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0"}
    for key, value in {**env, "WORLD_SIZE": "1", "LOCAL_RANK": "0"}.items():
        patch.setenv(key, value)


def release() -> None:
    """End the process group DeepSpeed started (before ``patch`` forgets its caches)."""
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
