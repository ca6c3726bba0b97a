"""Shared fixtures. Everything runs on the CPU in fp32 unless a test says otherwise."""

from __future__ import annotations

from pathlib import Path

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


def cpu_flags() -> set[str]:
    """This CPU's feature flags from /proc/cpuinfo (empty where there is none): what a kernel test expects
    to be usable here."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()
