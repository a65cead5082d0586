"""Shared fixtures of the health tests."""

from __future__ import annotations

import pytest


@pytest.fixture
def one_thread():
    """Tiny models train faster on one intra-op thread on a shared machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
