"""Shared fixtures. Everything runs on the CPU in fp32 unless a test says otherwise."""

from __future__ import annotations

import pytest
import torch

import registry


@pytest.fixture(autouse=True)
def _fresh_registry():
    """Each test starts from the installed plugins only (no leftovers from register())."""
    registry.reset()
    torch.manual_seed(0)
    yield
    registry.reset()
