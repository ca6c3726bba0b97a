"""Helpers that compare our tokenizers' outputs with the reference's."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import pytest


def plain(value: Any) -> Any:
    """Tensors, arrays and tuples -> nested lists of Python numbers, for comparison."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, (list, tuple)):
        return [plain(item) for item in value]
    return value


def assert_same(ours: Mapping[str, Any], reference: Mapping[str, Any], keys: Iterable[str] | None = None) -> None:
    """Equal values under ``keys`` (default: the same keys, all equal), tensor or list alike."""
    if keys is None:
        assert set(ours) == set(reference), f"keys differ: ours {sorted(ours)}, reference {sorted(reference)}"
        keys = reference.keys()
    for key in keys:
        assert plain(ours[key]) == plain(reference[key]), f"'{key}' differs"


def same_or_both_fail(ours: Callable[[], Any], reference: Callable[[], Any]) -> tuple[Any, Any] | None:
    """Run both; if the reference raises, ours must raise a ValueError too (None is returned)."""
    try:
        expected = reference()
    except Exception:
        with pytest.raises(ValueError):
            ours()
        return None
    return ours(), expected
