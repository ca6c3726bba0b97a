"""Absolute positions: a learned table, one vector per position, added to the input embeddings (BERT).

The table has ``max_position_embeddings`` rows; a position beyond it is an :class:`InputError` that
names the limit, never an index error deep in ``nn.Embedding``.
"""

from __future__ import annotations

from torch import Tensor, nn

from registry.errors import InputError
from registry.interfaces import BuildContext, PositionCapabilities, PositionEncoding, PositionPlugin, Positions


class AbsoluteEncoding(PositionEncoding):
    """``hidden + position_embeddings[position]``; positions (batch or 1, q_len)."""

    def __init__(self, max_positions: int, hidden_size: int):
        super().__init__()
        self.max_positions = max_positions
        self.position_embeddings = nn.Embedding(max_positions, hidden_size)

    def embed(self, hidden: Tensor, positions: Positions) -> Tensor:
        query = positions.query
        if query.numel() and query.device.type != "meta":
            low, high = int(query.min()), int(query.max())
            if low < 0 or high >= self.max_positions:
                raise InputError(
                    f"position {high if high >= self.max_positions else low} is outside the position table: "
                    f"max_position_embeddings is {self.max_positions}, so a sequence (cache included) may hold "
                    f"at most {self.max_positions} tokens"
                )
        return hidden + self.position_embeddings(query)


class AbsolutePlugin(PositionPlugin):
    name = "absolute"
    capabilities = PositionCapabilities(
        effects=frozenset({"embedding"}), requires_config=frozenset({"max_position_embeddings"}), priority=5
    )

    def create(self, context: BuildContext) -> AbsoluteEncoding:
        return AbsoluteEncoding(context.config.max_position_embeddings, context.hidden_size)  # type: ignore[attr-defined]


absolute = AbsolutePlugin()
