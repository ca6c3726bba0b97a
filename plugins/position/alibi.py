"""ALiBi (Press et al., 2021): a per-head linear bias on the key distance, handed to backends as slopes.

Slopes for n heads: with p the largest power of two <= n, head h (1-based) gets 2^(-8h/p); when n is
not a power of two, the remaining n - p heads take the odd powers 1, 3, 5, ... of 2^(-8/(2p)).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from registry.interfaces import (
    AlibiBias,
    BuildContext,
    PositionCapabilities,
    PositionEncoding,
    PositionPlugin,
    Positions,
    ScoreBias,
)


def alibi_slopes(num_heads: int, device: torch.device | str = "cpu") -> Tensor:
    """(num_heads,) float32 slopes, bit-identical to the reference's."""
    if num_heads < 1:
        raise ValueError(f"ALiBi needs at least one head, got {num_heads}")
    p = 2 ** math.floor(math.log2(num_heads))
    slopes = torch.pow(
        torch.tensor(2.0 ** (-8.0 / p), dtype=torch.float32, device=device),
        torch.arange(1, p + 1, dtype=torch.int32, device=device),
    )
    if p != num_heads:
        extra = torch.pow(
            torch.tensor(2.0 ** (-8.0 / (2 * p)), dtype=torch.float32, device=device),
            torch.arange(1, 2 * (num_heads - p), 2, dtype=torch.int32, device=device),
        )
        slopes = torch.cat([slopes, extra])
    return slopes


class AlibiEncoding(PositionEncoding):
    def __init__(self, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self._slopes: dict[torch.device, Tensor] = {}

    def slopes(self, device: torch.device) -> Tensor:
        if device not in self._slopes:
            self._slopes[device] = alibi_slopes(self.num_heads, device)
        return self._slopes[device]

    def score_biases(self, positions: Positions, *, num_layers: int) -> Sequence[ScoreBias | None]:
        # one bias object for the whole forward: every layer shares it (and its materialisation)
        bias = AlibiBias(self.slopes(positions.key.device), positions.key)
        return [bias] * num_layers


class AlibiPlugin(PositionPlugin):
    name = "alibi"
    capabilities = PositionCapabilities(effects=frozenset({"bias"}), bias_kind="alibi", priority=10)

    def create(self, context: BuildContext) -> AlibiEncoding:
        return AlibiEncoding(context.num_heads)


alibi = AlibiPlugin()
