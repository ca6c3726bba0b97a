"""Forward outputs with the reference's field names: attribute, key and index access."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from torch import Tensor


class ModelOutput:
    """An ordered record of output fields; fields that are None are skipped by index and iteration,
    as in the reference, so ``out[0]`` is the loss when there is one and the logits otherwise.

    Example:
        >>> out = model(input_ids=ids, labels=ids)
        >>> out.loss, out["logits"], out[1]
    """

    def __init__(self, kind: str, fields: dict[str, Any]):
        object.__setattr__(self, "_kind", kind)
        object.__setattr__(self, "_fields", dict(fields))

    def __getattr__(self, name: str) -> Any:
        fields = object.__getattribute__(self, "_fields")
        if name in fields:
            return fields[name]
        raise AttributeError(f"{self._kind} has no field '{name}'; fields: {', '.join(fields)}")

    def __setattr__(self, name: str, value: Any) -> None:
        self._fields[name] = value

    def __getitem__(self, key: str | int | slice) -> Any:
        if isinstance(key, str):
            if key not in self._fields or self._fields[key] is None:
                raise KeyError(key)
            return self._fields[key]
        return self.to_tuple()[key]

    def __contains__(self, key: object) -> bool:
        return key in self._fields and self._fields[key] is not None

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self.keys())

    def keys(self) -> list[str]:
        return [k for k, v in self._fields.items() if v is not None]

    def values(self) -> list[Any]:
        return [self._fields[k] for k in self.keys()]

    def items(self) -> list[tuple[str, Any]]:
        return [(k, self._fields[k]) for k in self.keys()]

    def to_tuple(self) -> tuple[Any, ...]:
        return tuple(self.values())

    def __repr__(self) -> str:
        parts = []
        for k, v in self.items():
            shown = f"Tensor{tuple(v.shape)}" if isinstance(v, Tensor) else type(v).__name__
            parts.append(f"{k}={shown}")
        return f"{self._kind}({', '.join(parts)})"
