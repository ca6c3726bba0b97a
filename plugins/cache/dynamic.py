"""Dynamic KV cache: per-layer key/value tensors that grow by concatenation."""

from __future__ import annotations

import torch
from torch import Tensor

from registry.interfaces import CacheCapabilities, CachePlugin, KVCache


class DynamicCache(KVCache):
    def __init__(self, num_layers: int):
        self.keys: list[Tensor | None] = [None] * num_layers
        self.values: list[Tensor | None] = [None] * num_layers

    def update(self, layer: int, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor]:
        old_k, old_v = self.keys[layer], self.values[layer]
        if old_k is None or old_v is None:
            new_k, new_v = key, value
        else:
            new_k, new_v = torch.cat([old_k, key], dim=2), torch.cat([old_v, value], dim=2)
        self.keys[layer], self.values[layer] = new_k, new_v
        return new_k, new_v

    def get_seq_length(self, layer: int = 0) -> int:
        k = self.keys[layer]
        return 0 if k is None else k.shape[2]

    def reorder(self, index: Tensor) -> None:
        self.keys = [None if k is None else k.index_select(0, index) for k in self.keys]
        self.values = [None if v is None else v.index_select(0, index) for v in self.values]

    def __len__(self) -> int:
        return len(self.keys)

    def __repr__(self) -> str:
        return f"DynamicCache(layers={len(self.keys)}, tokens={self.get_seq_length()})"


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
        return DynamicCache(num_layers)


dynamic = DynamicCachePlugin()
