"""Rotary position embeddings as a registry position plugin.

Pairs of channels (i, i + D/2) of q and k are rotated by the angle ``position * base^(-2i/D)``, so
that ``q_m . k_n`` depends on positions only through ``m - n``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from registry.interfaces import BuildContext, PositionCapabilities, PositionEncoding, PositionPlugin, Positions


def rotate_half(x: Tensor) -> Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)


class RotaryEncoding(PositionEncoding):
    def __init__(self, head_dim: int, base: float = 10000.0):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"rotary embeddings need an even head_dim, got {head_dim}")
        self.head_dim, self.base = head_dim, base

    def angles(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """cos and sin of (batch, 1, tokens, head_dim) for integer positions (batch, tokens)."""
        exponent = torch.arange(0, self.head_dim, 2, device=positions.device, dtype=torch.float32) / self.head_dim
        inv_freq = self.base**-exponent  # (D/2,)
        theta = positions.float()[..., None] * inv_freq  # (B, T, D/2)
        theta = torch.cat([theta, theta], dim=-1)[:, None]  # (B, 1, T, D)
        return theta.cos(), theta.sin()

    def rotate(self, q: Tensor, k: Tensor, positions: Positions) -> tuple[Tensor, Tensor]:
        cos, sin = self.angles(positions.query)
        cos, sin = cos.to(q.dtype), sin.to(q.dtype)
        return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


class RotaryPlugin(PositionPlugin):
    name = "rotary"
    capabilities = PositionCapabilities(effects=frozenset({"rotary"}), priority=1)

    def refusals(self, context) -> list[str]:  # type: ignore[no-untyped-def]
        return [] if context.head_dim % 2 == 0 else [f"needs an even head_dim, got {context.head_dim}"]

    def create(self, context: BuildContext) -> RotaryEncoding:
        return RotaryEncoding(context.head_dim)


rotary = RotaryPlugin()
