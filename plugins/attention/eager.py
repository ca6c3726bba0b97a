"""Eager attention: the reference's math, step by step. Returns attention weights; accepts any bias."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from registry.interfaces import AttentionBackend, AttentionCapabilities, AttentionOutput, Mask, ScoreBias


class EagerAttention(AttentionBackend):
    name = "eager"
    capabilities = AttentionCapabilities(
        bias_kinds=frozenset({"alibi", "tensor", "query-key"}),
        attention_weights=True,
        priority=0,
    )

    def __call__(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        *,
        mask: Mask,
        bias: ScoreBias | None,
        scale: float,
        dropout: float = 0.0,
        need_weights: bool = False,
    ) -> AttentionOutput:
        batch, heads, q_len, head_dim = q.shape
        k_len = k.shape[2]
        q3 = q.reshape(batch * heads, q_len, head_dim)
        kt3 = k.reshape(batch * heads, k_len, head_dim).transpose(1, 2)
        if bias is not None:
            # bias + scale * q @ k^T in one op, as the reference does (same rounding in low precision)
            b = bias.materialize(q, k).expand(batch, heads, -1, k_len)
            scores = torch.baddbmm(b.reshape(batch * heads, -1, k_len), q3, kt3, alpha=scale)
        else:
            scores = torch.bmm(q3, kt3) * scale
        scores = scores.view(batch, heads, q_len, k_len)  # (B, H, T, S)
        masked = mask.additive(scores.dtype, scores.device)
        if masked is not None:
            scores = scores + masked
        probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        if dropout > 0.0:
            probs = F.dropout(probs, p=dropout, training=True)
        out = torch.matmul(probs, v)  # (B, H, T, D)
        return AttentionOutput(out, probs if need_weights else None)


eager = EagerAttention()
