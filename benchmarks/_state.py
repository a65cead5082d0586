"""Bit-for-bit comparison of saved training states (nested dicts and lists of tensors)."""

from __future__ import annotations

from typing import Any

import torch


def assert_same(a: Any, b: Any, path: str = "state") -> None:
    """Assert ``a`` and ``b`` equal bit for bit (NaN equal to NaN), naming the first
    field that differs by its path."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, path
        assert torch.equal(a.isnan(), b.isnan()), path
        assert torch.equal(a.nan_to_num(), b.nan_to_num()), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for key in a:
            assert_same(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]")
    else:
        assert a == b or (a != a and b != b), f"{path}: {a!r} != {b!r}"
