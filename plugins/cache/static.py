"""Static KV cache: one preallocated (batch, heads, max_length, head_dim) buffer per layer for keys and
one for values, written in place at the next free positions and never reallocated.

Fixed shapes and stable addresses are what a CUDA graph needs to replay a decode step; on any device
they also spare the allocator a growing concatenation per layer and step. Attention always sees the
whole buffer (``key_length`` is ``max_length``): the family marks the slots not yet written as padding
(or causality hides them), so the unwritten zeros never reach a softmax.
"""

from __future__ import annotations

import torch
from torch import Tensor

from registry.errors import CacheOverflowError, InputError
from registry.interfaces import CacheCapabilities, CachePlugin, KVCache


class StaticCache(KVCache):
    def __init__(
        self,
        *,
        batch_size: int,
        num_layers: int,
        num_heads: int,
        head_dim: int,
        max_length: int,
        dtype: torch.dtype,
        device: torch.device,
    ):
        shape = (batch_size, num_heads, max_length, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.lengths = [0] * num_layers
        self._capacity = max_length

    @property
    def max_length(self) -> int:
        return self._capacity

    def update(self, layer: int, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor]:
        keys, values = self.keys[layer], self.values[layer]
        start, new = self.lengths[layer], key.shape[2]
        if start + new > self._capacity:
            raise CacheOverflowError(
                f"the static cache holds {self._capacity} tokens and layer {layer} already stores {start}; "
                f"{new} more do not fit. Create it with a larger max_length (model.new_cache(batch_size, "
                "max_length=...); generate() sizes it as prompt + max_new_tokens)"
            )
        if key.shape[0] != keys.shape[0] or key.shape[1] != keys.shape[1] or key.shape[3] != keys.shape[3]:
            raise InputError(
                f"key of shape {tuple(key.shape)} does not fit the static cache's buffers of shape "
                f"{tuple(keys.shape)} (batch, heads, max_length, head_dim)"
            )
        if key.dtype != keys.dtype or value.dtype != values.dtype:
            raise InputError(
                f"the static cache stores {keys.dtype}; got keys of {key.dtype} and values of {value.dtype}: "
                "create the cache with the model's dtype"
            )
        keys[:, :, start : start + new].copy_(key)
        values[:, :, start : start + new].copy_(value)
        self.lengths[layer] = start + new
        return keys, values

    def get_seq_length(self, layer: int = 0) -> int:
        return self.lengths[layer]

    def reserve(self, new_tokens: int) -> list[tuple[Tensor, Tensor]] | None:
        """The buffers themselves (they never move); None while the layers hold different numbers of
        tokens. CacheOverflowError where ``new_tokens`` more do not fit, as in :meth:`update`."""
        if any(n != self.lengths[0] for n in self.lengths):
            return None
        self.key_length(new_tokens)  # raises CacheOverflowError past the capacity
        return list(zip(self.keys, self.values, strict=True))

    def commit(self, new_tokens: int) -> None:
        self.key_length(new_tokens)
        self.lengths = [n + new_tokens for n in self.lengths]

    def key_length(self, new_tokens: int) -> int:
        needed = self.get_seq_length() + new_tokens
        if needed > self._capacity:
            raise CacheOverflowError(
                f"the static cache holds {self._capacity} tokens; {self.get_seq_length()} are stored and "
                f"{new_tokens} more do not fit. Create it with a larger max_length (model.new_cache(batch_size, "
                "max_length=...); generate() sizes it as prompt + max_new_tokens)"
            )
        return self._capacity

    def reorder(self, index: Tensor) -> None:
        """Permute the batch rows in place (beam search); the batch size cannot change."""
        rows = self.keys[0].shape[0] if self.keys else 0
        if index.numel() != rows:
            raise InputError(
                f"a static cache keeps its batch size ({rows}); reorder() got {index.numel()} rows. "
                "Use the 'dynamic' cache to drop rows"
            )
        for buffers in (self.keys, self.values):
            for buffer in buffers:
                buffer.copy_(buffer.index_select(0, index.to(buffer.device)))

    def reset(self) -> None:
        """Forget every stored token (the buffers keep their memory and addresses)."""
        self.lengths = [0] * len(self.lengths)

    def __len__(self) -> int:
        return len(self.keys)

    def __repr__(self) -> str:
        shape = tuple(self.keys[0].shape) if self.keys else ()
        return f"StaticCache(layers={len(self.keys)}, buffer={shape}, tokens={self.get_seq_length()})"


class StaticCachePlugin(CachePlugin):
    name = "static"
    capabilities = CacheCapabilities(fixed_shape=True, priority=5)

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
    ) -> StaticCache:
        if max_length is None or max_length < 1:
            raise InputError(
                f"the static cache needs max_length >= 1 (got {max_length}): it preallocates that many positions. "
                "Create one with model.new_cache(batch_size, max_length=...) and pass it as past_key_values, "
                "or use generate(), which sizes it as prompt + max_new_tokens"
            )
        return StaticCache(
            batch_size=batch_size,
            num_layers=num_layers,
            num_heads=num_heads,
            head_dim=head_dim,
            max_length=max_length,
            dtype=dtype,
            device=device,
        )


static = StaticCachePlugin()
