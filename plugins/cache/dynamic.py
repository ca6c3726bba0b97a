"""Dynamic KV cache: per-layer key/value buffers that grow as tokens arrive, with no length set in advance.

Each layer's keys and values live in a buffer with spare room along the token axis; new tokens are written
into it in place, and the layer gets a view of the tokens so far. When the room runs out the buffer is
reallocated with its capacity doubled, so a step costs a copy of its own tokens, not of the whole history
(concatenation, as the reference does, copies every cached token at every step: quadratic in the length).
The price is up to twice the memory of the tokens held, which :meth:`DynamicCache.shrink` gives back.

A length given in advance (``model.new_cache(batch, max_length)``; ``generate()`` passes prompt + new
tokens) sizes the first allocation when it is at most twice what that allocation would hold anyway, so a
short generation never reallocates while the memory bound stays that of doubling: a generation allowed
100,000 tokens that stops at the tenth holds room for 64, not 100,000. Past it the cache grows as always.
"""

from __future__ import annotations

import torch
from torch import Tensor

from registry.interfaces import CacheCapabilities, CachePlugin, KVCache

MIN_CAPACITY = 64  # tokens: the first allocation of a layer holds at least this many


class DynamicCache(KVCache):
    def __init__(
        self,
        num_layers: int,
        expected_length: int | None = None,
        *,
        like: tuple[int, int, int, torch.dtype, torch.device] | None = None,
    ):
        if expected_length is not None and (
            not isinstance(expected_length, int) or isinstance(expected_length, bool) or expected_length < 0
        ):
            raise ValueError(f"expected_length must be a whole number of tokens >= 0, or None; got {expected_length!r}")
        self.expected_length = expected_length  # tokens the first allocation of a layer may make room for
        # (batch, heads, head size, dtype, device) the model creates it for: what reserve() allocates when
        # no update has shown them yet (update() allocates for what it is given)
        self.like = like
        self._keys: list[Tensor | None] = [None] * num_layers  # (B, H, capacity, D)
        self._values: list[Tensor | None] = [None] * num_layers
        self._lengths = [0] * num_layers

    @property
    def keys(self) -> list[Tensor | None]:
        """Each layer's cached keys, (B, H, tokens, D) views (None while the layer holds no tokens, even
        where reserve() has made its buffers)."""
        return [None if k is None or not n else k[:, :, :n] for k, n in zip(self._keys, self._lengths, strict=True)]

    @property
    def values(self) -> list[Tensor | None]:
        return [None if v is None or not n else v[:, :, :n] for v, n in zip(self._values, self._lengths, strict=True)]

    def update(self, layer: int, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor]:
        if key.shape[2] != value.shape[2]:
            raise ValueError(f"keys hold {key.shape[2]} new tokens but values {value.shape[2]}: they must match")
        keys, values, length = self._keys[layer], self._values[layer], self._lengths[layer]
        end = length + key.shape[2]
        if (
            keys is None
            or values is None
            or end > keys.shape[2]
            or not _same_rows(keys, key)
            or not _same_rows(values, value)
        ):
            # both buffers are made (or the error raised) before either is replaced: a failed update
            # leaves the cache as it was
            expected = self.expected_length or 0
            new_keys = _grown(keys, key, length, end, expected)
            new_values = _grown(values, value, length, end, expected)
            keys, values = self._keys[layer], self._values[layer] = new_keys, new_values
        n = end - length
        keys.narrow(2, length, n).copy_(key)
        values.narrow(2, length, n).copy_(value)
        self._lengths[layer] = end
        return keys.narrow(2, 0, end), values.narrow(2, 0, end)

    def get_seq_length(self, layer: int = 0) -> int:
        return self._lengths[layer]

    def reserve(self, new_tokens: int) -> list[tuple[Tensor, Tensor]] | None:
        """Each layer's buffers with room for ``new_tokens`` more (grown as :meth:`update` grows them; an empty
        cache's first buffers made as :meth:`update` would make them, for the shape it was created for).
        None while the layers hold different numbers of tokens, or when the cache is empty and was created
        without a shape (``like``)."""
        if any(n != self._lengths[0] for n in self._lengths):
            return None
        length = self._lengths[0] if self._lengths else 0
        if not length:
            return self._first_buffers(new_tokens)
        end = length + new_tokens
        slots = []
        for layer, (keys, values) in enumerate(zip(self._keys, self._values, strict=True)):
            if keys is None or values is None:
                return None
            if end > keys.shape[2]:
                expected = self.expected_length or 0
                keys, values = _grown(keys, keys, length, end, expected), _grown(values, values, length, end, expected)
                self._keys[layer], self._values[layer] = keys, values
            slots.append((keys, values))
        return slots

    def _first_buffers(self, new_tokens: int) -> list[tuple[Tensor, Tensor]] | None:
        """reserve() on an empty cache: buffers of the created-for shape with room for ``new_tokens``."""
        if self.like is None:
            return None
        batch, heads, head_dim, dtype, device = self.like
        capacity = _first_capacity(new_tokens, self.expected_length or 0)
        slots = []
        for layer, (keys, values) in enumerate(zip(self._keys, self._values, strict=True)):
            if not (_fits(keys, self.like, new_tokens) and _fits(values, self.like, new_tokens)):
                keys = torch.empty(batch, heads, capacity, head_dim, dtype=dtype, device=device)
                values = torch.empty(batch, heads, capacity, head_dim, dtype=dtype, device=device)
                self._keys[layer], self._values[layer] = keys, values
            slots.append((keys, values))
        return slots

    def commit(self, new_tokens: int) -> None:
        capacity = min((k.shape[2] for k in self._keys if k is not None), default=0)
        if any(n + new_tokens > capacity for n in self._lengths):
            raise ValueError(f"commit({new_tokens}) without the room reserve({new_tokens}) makes")
        self._lengths = [n + new_tokens for n in self._lengths]

    def reorder(self, index: Tensor) -> None:
        self._keys = [None if k is None else k.index_select(0, index) for k in self._keys]
        self._values = [None if v is None else v.index_select(0, index) for v in self._values]

    def shrink(self) -> None:
        """Give back the spare room: each buffer becomes exactly as long as its tokens."""
        self._keys = [
            None if k is None else k[:, :, :n].clone() for k, n in zip(self._keys, self._lengths, strict=True)
        ]
        self._values = [
            None if v is None else v[:, :, :n].clone() for v, n in zip(self._values, self._lengths, strict=True)
        ]

    def __len__(self) -> int:
        return len(self._keys)

    def __repr__(self) -> str:
        return f"DynamicCache(layers={len(self._keys)}, tokens={self.get_seq_length()})"


def _same_rows(buffer: Tensor, new: Tensor) -> bool:
    """Whether ``new`` (B, H, T, D) can be written into ``buffer`` (same batch, heads, head size, dtype,
    device); otherwise :func:`_grown` makes a new buffer, or refuses when tokens are already held."""
    return (
        buffer.shape[:2] == new.shape[:2]
        and buffer.shape[3] == new.shape[3]
        and buffer.dtype == new.dtype
        and buffer.device == new.device
    )


def _fits(buffer: Tensor | None, like: tuple[int, int, int, torch.dtype, torch.device], tokens: int) -> bool:
    """Whether an empty cache's ``buffer`` (from an earlier reserve()) holds ``tokens`` of the shape ``like``."""
    if buffer is None:
        return False
    batch, heads, head_dim, dtype, device = like
    return (
        buffer.shape[:2] == (batch, heads)
        and buffer.shape[3] == head_dim
        and buffer.shape[2] >= tokens
        and buffer.dtype == dtype
        and buffer.device == device
    )


def _first_capacity(needed: int, expected: int) -> int:
    """Tokens a layer's first buffer holds: ``needed`` (at least MIN_CAPACITY), or the expected length
    where that is at most twice as much (the bound doubling keeps too)."""
    capacity = max(needed, MIN_CAPACITY)
    return expected if capacity <= expected <= 2 * capacity else capacity


def _grown(old: Tensor | None, new: Tensor, length: int, needed: int, expected: int) -> Tensor:
    """A buffer for at least ``needed`` tokens (doubling the old capacity; see :func:`_first_capacity` for
    a first one), holding the old buffer's first ``length`` tokens."""
    capacity = max(needed, 2 * old.shape[2]) if old is not None else _first_capacity(needed, expected)
    if old is not None and length and not _same_rows(old, new):
        # different batch/heads/head size/dtype: the reference's concatenation would fail, and so do we
        raise ValueError(
            f"cannot append keys/values of shape {tuple(new.shape)} ({new.dtype}) to a cache holding "
            f"{tuple(old[:, :, :length].shape)} ({old.dtype})"
        )
    buffer = new.new_empty(new.shape[0], new.shape[1], capacity, new.shape[3])
    if old is not None and length:
        buffer[:, :, :length] = old[:, :, :length]
    return buffer


class DynamicCachePlugin(CachePlugin):
    name = "dynamic"
    capabilities = CacheCapabilities(fixed_shape=False, priority=10)

    def create(
        self,
        *,
        batch_size: int,
        num_layers: int,
        num_heads: int,
        head_dim: int,
        max_length: int | None,
        dtype: torch.dtype,
        device: torch.device,
    ) -> DynamicCache:
        return DynamicCache(
            num_layers, expected_length=max_length, like=(batch_size, num_heads, head_dim, dtype, torch.device(device))
        )


dynamic = DynamicCachePlugin()
