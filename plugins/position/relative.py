"""Relative positions of Shaw et al. (2018) and Huang et al. (2020), as BERT's ``relative_key`` and
``relative_key_query`` position_embedding_type.

Every layer owns a table ``E`` of ``2 * max_position_embeddings - 1`` vectors of head_dim, indexed by
the distance ``i - j`` between query ``i`` and key ``j``. The score of (i, j) gains

* relative-key:        ``q_i . E[i - j]``
* relative-key-query:  ``q_i . E[i - j] + k_j . E[i - j]``

scaled by ``head_dim ** -0.5`` like ``q . k``. The bias depends on the queries and keys, so it reaches a
backend as a :class:`QueryKeyBias` ("query-key" kind): a backend that cannot take one is refused at
selection time, with the reason in ``explain()``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from registry.errors import InputError
from registry.interfaces import (
    BuildContext,
    PositionCapabilities,
    PositionEncoding,
    PositionPlugin,
    Positions,
    QueryKeyBias,
    ScoreBias,
)


def relative_scores(q: Tensor, k: Tensor, *, table: Tensor, index: Tensor, with_keys: bool, scale: float) -> Tensor:
    """(B, H, T, S) bias from q (B, H, T, D), k (B, H, S, D), the distance table (2M - 1, D) and
    ``index`` (1 or B, T, S) into it."""
    embedding = F.embedding(index, table).to(q.dtype)  # (1 or B, T, S, D)
    if embedding.shape[0] == 1:  # the same distances for every row: (T, S, D), as the reference
        embedding = embedding[0]
        scores = torch.einsum("bhld,lrd->bhlr", q, embedding)
        if with_keys:
            scores = scores + torch.einsum("bhrd,lrd->bhlr", k, embedding)
    else:
        scores = torch.einsum("bhld,blrd->bhlr", q, embedding)
        if with_keys:
            scores = scores + torch.einsum("bhrd,blrd->bhlr", k, embedding)
    return scores * scale


class RelativeEncoding(PositionEncoding):
    """Per-layer distance tables; one :class:`QueryKeyBias` per layer per forward."""

    def __init__(self, *, max_positions: int, num_layers: int, head_dim: int, with_keys: bool):
        super().__init__()
        self.max_positions = max_positions
        self.with_keys = with_keys
        self.scale = head_dim**-0.5
        self.distance_embedding = nn.ModuleList(
            nn.Embedding(2 * max_positions - 1, head_dim) for _ in range(num_layers)
        )

    def distance_index(self, positions: Positions) -> Tensor:
        """(1 or B, T, S) rows of the tables: ``query position - key position + max_positions - 1``."""
        index = positions.query[:, :, None] - positions.key[:, None, :] + (self.max_positions - 1)
        if index.numel() and index.device.type != "meta":
            low, high = int(index.min()), int(index.max())
            if low < 0 or high > 2 * self.max_positions - 2:
                span = int(positions.key.max()) - int(positions.key.min()) + 1
                raise InputError(
                    f"distances between {span} positions exceed the relative position tables: "
                    f"max_position_embeddings is {self.max_positions}, so a sequence (cache included) may hold "
                    f"at most {self.max_positions} tokens"
                )
        return index

    def score_biases(self, positions: Positions, *, num_layers: int) -> Sequence[ScoreBias | None]:
        if num_layers != len(self.distance_embedding):
            raise ValueError(f"built for {len(self.distance_embedding)} layers, asked for {num_layers}")
        index = self.distance_index(positions)
        return [
            QueryKeyBias(
                functools.partial(
                    relative_scores, table=table.weight, index=index, with_keys=self.with_keys, scale=self.scale
                )
            )
            for table in self.distance_embedding
        ]


class RelativePlugin(PositionPlugin):
    def __init__(self, name: str, *, with_keys: bool):
        self.name = name
        self.with_keys = with_keys
        self.capabilities = PositionCapabilities(
            effects=frozenset({"bias"}),
            bias_kind="query-key",
            requires_config=frozenset({"max_position_embeddings"}),
        )

    def create(self, context: BuildContext) -> RelativeEncoding:
        return RelativeEncoding(
            max_positions=context.config.max_position_embeddings,  # type: ignore[attr-defined]
            num_layers=context.num_layers,
            head_dim=context.head_dim,
            with_keys=self.with_keys,
        )


relative_key = RelativePlugin("relative-key", with_keys=False)
relative_key_query = RelativePlugin("relative-key-query", with_keys=True)
