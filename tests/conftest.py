"""Shared test helpers."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import pytest
import torch

try:
    from hypothesis import settings
except ImportError:  # the property tests skip without the dev extra
    settings = None

if settings is not None:
    # CI draws the same examples on every run, so a landing never turns on a lucky draw;
    # anywhere else each run draws new ones (how the fuzz tests have found real bugs).
    settings.register_profile("ci", derandomize=True, database=None)
    if os.environ.get("GRADGUARD_TEST_PROFILE", "ci" if os.environ.get("CI") else "") == "ci":
        settings.load_profile("ci")


@contextlib.contextmanager
def forbid_host_sync() -> Iterator[None]:
    """Make every tensor→host conversion raise inside the block.

    On CPU a host sync cannot be observed directly, so this catches the Python-level
    calls that would force one on an accelerator: ``item``, ``tolist``, ``cpu``,
    ``numpy``, ``__bool__``, ``__float__``, ``__int__``.
    """
    names = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")
    saved = {name: getattr(torch.Tensor, name) for name in names}

    def refuse(name: str):
        def method(self, *args, **kwargs):
            raise AssertionError(f"host sync: Tensor.{name} called on the hot path")

        return method

    try:
        for name in names:
            setattr(torch.Tensor, name, refuse(name))
        yield
    finally:
        for name, method in saved.items():
            setattr(torch.Tensor, name, method)


@pytest.fixture
def no_host_sync():
    return forbid_host_sync
